"""llm_core.entrypoints"""
