"""Integrations with other libraries; each submodule imports its library only when imported itself.

    import attnfast.integrations.transformers as hf
    hf.register()   # attn_implementation="attnfast" in Hugging Face transformers
"""
