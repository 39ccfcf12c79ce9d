"""steerlab.viz"""
