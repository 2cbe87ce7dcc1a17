"""fluxserve: a self-hosted server for FLUX image models."""

__version__ = "0.1.0"
