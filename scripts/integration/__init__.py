"""Programs and hooks that use the bundle from MONAI Label and MONAI Deploy (each needs its own install, see
README.md); importing this package imports neither."""
