"""Files in and out: images and inputs, datasets, our checkpoint format and the converters from other
projects, proposal outputs in each tool's format, overlays, and files written atomically."""
