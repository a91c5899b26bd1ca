"""Scripts that time things and print tables (README.md here); run from the repository root."""
