"""The Gradio app: one module per tab plus shared helpers; handlers stay thin."""
