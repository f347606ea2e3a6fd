"""The web app's Gradio side, imported by ``app.py`` (the entry point): ``api`` (the /generate
request's input and the web server's request plumbing), ``state`` (a browser tab's state) and
``views`` (conversations rendered into component values)."""
