"""Serving: the OpenAI-compatible HTTP app and the Streamlit chat page, over generate/'s Engine."""
