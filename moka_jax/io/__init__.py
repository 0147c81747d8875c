"""Adapters in and out: adapter_format (moka-jax's own file, below training and every reader),
adapter_io (one reader / writer for safetensors, orbax and PEFT directories), peft_io (PEFT
interchange), attach (an exported adapter checked against and attached to a base), export
(merging adapters into the base)."""
