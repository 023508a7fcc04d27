"""llm_core.engine"""
