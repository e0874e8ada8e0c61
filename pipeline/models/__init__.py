"""Loading and saving models, below both stages.

- :mod:`.modules`: PyTorch modules named ``package.module:factory`` and their safetensors weights;
- :mod:`.students`: building, loading and saving a student;
- :mod:`.tokenizers`: loading a tokenizer, and the fingerprint that tells two apart;
- :mod:`.devices`: ``--device`` and ``--dtype``;
- :mod:`.hub`: one quick question to the Hugging Face Hub.
"""
