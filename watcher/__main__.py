"""``python -m watcher ROOT``: the watch command on its own (same as ``psd-collage watch``)."""

from .cli import watch

if __name__ == "__main__":
    watch(prog_name="psd-collage watch")
