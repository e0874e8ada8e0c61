import click

@click.group()
def main():
    """kdpipe"""
