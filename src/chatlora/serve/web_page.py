"""The chat page. Streamlit runs this script top to bottom on every interaction; the conversation
lives in st.session_state. Start it with `chatlora web RUN`."""

import streamlit as st

from chatlora.serve.page import Reply, current_engine
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
        if message.get("note"):
            st.caption(message["note"])

if prompt := st.chat_input("Your message"):
    st.session_state.messages.append({"role": "user", "content": prompt})
    with st.chat_message("user"):
        st.markdown(prompt)
    history = [{"role": m["role"], "content": m["content"]} for m in st.session_state.messages]
    conversation = ([{"role": "system", "content": system}] if system.strip() else []) + history
    params = SamplingParams(max_tokens=int(max_tokens), temperature=float(temperature))
    reply = Reply(engine, model, conversation, params)
    with st.chat_message("assistant"):
        text = st.write_stream(reply)
        st.caption(reply.note)
    st.session_state.messages.append({"role": "assistant", "content": text, "note": reply.note})
