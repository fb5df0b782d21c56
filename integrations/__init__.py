"""Framework adapters (LangChain, LlamaIndex): thin layers over `beacon_apps.engine`."""
