"""difuse.models"""
