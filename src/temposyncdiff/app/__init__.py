"""tsd-app: the local web app (Gradio) over tsd-infer's generation."""
