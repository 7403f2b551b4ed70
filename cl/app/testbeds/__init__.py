"""Models the project trains once for its own test beds (synthetic-c's source, the forgetting original, the CLIP warm-up, the pre-trained tiny ViT).

They read scenario data and build models, so they sit in the application layer, registered as backbone sources by `cl.app.registry`."""
