"""Building blocks several model families share: attention probes for CLIP-style towers, runners that merge tokens
inside ViT blocks, and virtual token unmerging in Llama-style decoders."""
