"""LightningModules: one per trainable method."""
