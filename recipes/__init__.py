"""The built-in recipes (YAML files, installed as ``selftrain.recipes``; see README.md here)."""
