"""`python -m dqo_verl.pipeline +recipe=NAME [key=value ...]`: the stage runner (`runner.py`)."""

from dqo_verl.pipeline.runner import cli

if __name__ == "__main__":
    cli()
