"""Fine-tuning SAM 2 and tuning the mask generator."""
