"""Dataset readers: each turns files in a reference layout (or a procedural generator) into train/test datasets for the kinds to cut."""
