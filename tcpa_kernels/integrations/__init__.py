"""Model integrations: ``TCPAPrompts`` (prompts.py), block and model families (family.py, models.py) and one file per
package family. Importing this package imports no model library; ``models.load_integrations`` does, on first use."""
