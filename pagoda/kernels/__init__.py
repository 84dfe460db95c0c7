"""Worker layer: native (C++) kernels for CPU fast paths, built on first use and cached."""
