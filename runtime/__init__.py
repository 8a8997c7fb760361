"""difuse.runtime"""
