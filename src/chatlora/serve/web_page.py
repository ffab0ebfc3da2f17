"""The chat page. Streamlit runs this script top to bottom on every interaction; the conversation
lives in st.session_state. Start it with `chatlora web RUN`.

st.session_state.messages holds user and assistant turns in pairs. A reply's entry is made before it
streams and filled in as it comes, so a run that is stopped midway (the Stop button, a change in the
sidebar) leaves the text so far, noted as stopped, instead of a user turn without its reply. A message
the engine refuses (too long) is never added: the page says why and puts it back in the box.
"""

import inspect

import streamlit as st

from chatlora.serve.page import Reply, current_engine, refusal, sendable
from chatlora.generate.events import RequestError
from chatlora.serve.params import request_sampling

STOPPED = "stopped before the end"
# Streamlit's chat box that turns into a Stop button while the script runs (its "stop" submit mode),
# and can be refilled through st.session_state: both in the Streamlit versions with submit_mode. On
# older ones a new message stops the reply the same way, and a refused one is not put back.
NEWER_CHAT_BOX = "submit_mode" in inspect.signature(st.chat_input).parameters
THINKING = '<span role="status" class="chatlora-thinking">Thinking… {:.0f} s</span>'

# A run stopped while thinking cannot update the page any more: hide its indicator once the script is
# not running (Streamlit marks that on its root element), rather than leave "Thinking… 3 s" frozen.
HIDE_STALE = '<style>.stApp[data-test-script-state="notRunning"] .chatlora-thinking {display: none}</style>'

engine = current_engine()
st.set_page_config(page_title="chatlora", page_icon="💬")
st.html(HIDE_STALE)
state = st.session_state
if "messages" not in state:
    state.messages = []
if "restore" in state and NEWER_CHAT_BOX:  # a refused message, back in the box (before the box is made)
    state.prompt = state.pop("restore")

with st.sidebar:
    st.header("chatlora")
    model = st.selectbox("Model", engine.names, help="A run's adapter, or the base model without one.")
    system = st.text_area("System prompt", placeholder="You are a helpful assistant.")
    temperature = st.slider("Temperature", 0.0, 2.0, 0.7, 0.05, help="0 is greedy: the same reply every time.")
    max_tokens = st.number_input("Max new tokens", 1, engine.max_tokens, min(256, engine.max_tokens))
    # Before the history is drawn, so the click empties the page in the same run.
    if st.button("Clear history", type="secondary"):
        state.messages = []
        state.pop("refused", None)

st.caption(f"Chatting with **{model}**")
for message in state.messages:
    with st.chat_message(message["role"]):
        if message["content"]:
            st.markdown(message["content"])
        if message.get("note"):
            st.caption(message["note"])

# While a reply streams, the box is disabled and its button stops the reply.
prompt = st.chat_input("Your message", key="prompt", **({"submit_mode": "stop"} if NEWER_CHAT_BOX else {}))
if prompt:
    state.pop("refused", None)
elif state.get("refused"):
    st.error(state.refused)

if prompt:
    system_turn = [{"role": "system", "content": system}] if system.strip() else []
    conversation = system_turn + sendable(state.messages) + [{"role": "user", "content": prompt}]
    sampling = request_sampling(max_tokens=int(max_tokens), temperature=float(temperature))
    try:
        reply = Reply(engine, model, conversation, sampling)
    except RequestError as e:
        state.refused = refusal(e, engine, conversation, sampling)
        if NEWER_CHAT_BOX:
            state.restore = prompt
        st.rerun()
    answer = {"role": "assistant", "content": "", "note": STOPPED}
    state.messages += [{"role": "user", "content": prompt}, answer]
    with st.chat_message("user"):
        st.markdown(prompt)
    with st.chat_message("assistant"):
        body = st.empty()
        try:
            body.markdown(THINKING.format(0), unsafe_allow_html=True)
            for _ in reply.pieces():
                if reply.text:
                    body.markdown(reply.text)  # where a stopped run stops: the history keeps what was shown
                    answer["content"] = reply.text
                else:
                    body.markdown(THINKING.format(reply.waited), unsafe_allow_html=True)
            answer["note"] = reply.note
        finally:
            reply.cancel()
        st.caption(answer["note"])
