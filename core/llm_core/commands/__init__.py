"""llm_core.commands"""
