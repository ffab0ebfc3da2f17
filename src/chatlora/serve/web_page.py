"""The chat page. Streamlit runs this script top to bottom on every interaction; the conversation
lives in st.session_state. Start it with `chatlora web RUN`."""

import streamlit as st

from chatlora.serve.page import current_engine, reply_text
from chatlora.serve.params import SamplingParams

engine = current_engine()
st.set_page_config(page_title="chatlora", page_icon="💬")
if "messages" not in st.session_state:
    st.session_state.messages = []

with st.sidebar:
    st.header("chatlora")
    model = st.selectbox("Model", engine.names, help="A run's adapter, or the base model without one.")
    system = st.text_area("System prompt", placeholder="You are a helpful assistant.")
    temperature = st.slider("Temperature", 0.0, 2.0, 0.7, 0.05, help="0 is greedy: the same reply every time.")
    max_tokens = st.number_input("Max new tokens", 1, engine.max_tokens, min(256, engine.max_tokens))
    # Before the history is drawn, so the click empties the page in the same run.
    if st.button("Clear history", type="secondary"):
        st.session_state.messages = []

st.caption(f"Chatting with **{model}**")
for message in st.session_state.messages:
    with st.chat_message(message["role"]):
        st.markdown(message["content"])

if prompt := st.chat_input("Your message"):
    st.session_state.messages.append({"role": "user", "content": prompt})
    with st.chat_message("user"):
        st.markdown(prompt)
    conversation = ([{"role": "system", "content": system}] if system.strip() else []) + st.session_state.messages
    params = SamplingParams(max_tokens=int(max_tokens), temperature=float(temperature))
    with st.chat_message("assistant"):
        reply = st.write_stream(reply_text(engine, model, conversation, params))
    st.session_state.messages.append({"role": "assistant", "content": reply})
