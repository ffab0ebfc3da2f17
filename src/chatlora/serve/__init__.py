"""Serving: the generation engine, the OpenAI-compatible HTTP app and the Streamlit chat page."""
