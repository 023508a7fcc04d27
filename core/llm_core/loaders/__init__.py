"""llm_core.loaders"""
