"""steerlab.reft"""
