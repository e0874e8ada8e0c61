"""Loading and saving models, shared by both stages.

- :mod:`.modules`: PyTorch modules named ``package.module:factory`` and their safetensors weights;
- :mod:`.students`: building, loading and saving a student;
- :mod:`.hub`: one quick question to the Hugging Face Hub.
"""
