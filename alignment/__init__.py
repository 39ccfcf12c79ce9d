"""steerlab.alignment"""
