"""`python -m tp_embed FLAGS`: the `tp-embed` command (tp_embed/command.py)."""

from tp_embed.command import cli

if __name__ == "__main__":
    cli()
