"""The web app's Gradio side, imported by ``app.py`` (the entry point): ``panel`` (one chat panel over N
models and its handlers: the Chat tab has one model, Compare two), ``views`` (conversations rendered into
component values), ``state`` (a browser tab's state) and ``api`` (the /generate request's input and the
web server's request plumbing)."""
