"""The local web app (`llmlab serve RUN`): one page with an instrument for each section of the notes.

`instruments` computes what each panel shows with the same library calls as the commands,
`app` serves it as JSON next to the page in `static/` (plain HTML, CSS and JavaScript: no build
step, nothing fetched from the network).
"""
