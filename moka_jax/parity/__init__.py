"""Parity with PyTorch: reference adapters in torch (torch_ref) and the side-by-side training
run (compare) that checks our step against transformers + torch.optim.AdamW."""
