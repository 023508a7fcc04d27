"""The version of the HAL contract that backends are built against."""

# Bump the major number for any change a backend must react to (a new required argument, a
# changed layout); the minor number for additions a backend may ignore (a new optional op).
HAL_API_VERSION = "1.3"  # 1.1: optional Backend.capture_graph; 1.2: apply_token_bitmask;
# 1.3: gemma_rms_norm, soft_cap and scale (Gemma 2/3)


def api_compatible(plugin_version: str, host_version: str = HAL_API_VERSION) -> bool:
    """Compatible: the same major version as the host's, and a minor version no newer."""
    p_major, p_minor = (int(x) for x in plugin_version.split(".")[:2])
    h_major, h_minor = (int(x) for x in host_version.split(".")[:2])
    return p_major == h_major and p_minor <= h_minor
