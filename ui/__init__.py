"""The Gradio web app over `beacon_apps.engine`."""
