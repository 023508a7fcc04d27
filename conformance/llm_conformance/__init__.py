"""llm_conformance: the certification suite (see issue: conformance)."""
