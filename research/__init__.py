"""Research drivers: the searches, reproductions and speed runs behind results/ (run them as
`python -m research.<name>` from the repository root; each docstring has its commands)."""
