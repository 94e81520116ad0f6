"""Chat conversations: an optional system message, then one to three user/assistant turns.

Assistant answers reuse the prose, code and math generators, so chat samples cover the same
content as plain samples but wrapped in the shape chat-tuned Qwen models are calibrated on.
"""

import random

from . import chinese, code, english, mathprob

SYSTEMS = ["You are a helpful assistant.", "You are a friendly cooking and travel assistant.",
           "You are a careful math tutor. Show your steps.", "You are a concise coding assistant.",
           "你是一个乐于助人的助手。"]

EN_ASKS = {
    english.weather: ["What will the weather be like?", "Can you give me a short weather report?",
                      "Should I plan an outdoor trip this week?"],
    english.recipe: ["Can you suggest something simple to cook tonight?",
                     "I have a few basic ingredients. What can I make?", "Give me an easy recipe."],
    english.travel: ["Tell me about a short trip you would recommend.",
                     "I am planning a weekend away. Any ideas?"],
    english.science: ["Can you explain a bit of everyday science?", "I have a science question for you."],
    english.story: ["Tell me a short story.", "Could you write a little story for my kids?"],
}
ZH_ASKS = {
    chinese.weather: ["明天天气怎么样？", "请帮我看一下天气预报。"],
    chinese.recipe: ["今晚做什么菜好呢？", "教我做一道简单的家常菜吧。"],
    chinese.travel: ["有什么适合周末去的地方吗？", "给我讲讲你的旅行经历吧。"],
    chinese.science: ["能给我讲一个生活中的科学知识吗？", "我有一个科学问题想问你。"],
    chinese.story: ["给我讲个小故事吧。", "能写一个温暖的短故事吗？"],
}
CODE_ASKS = ["Can you write some example code for me?", "Show me a few small utility functions.",
             "I need help with a script. Can you give me an example?", "请给我写一段示例代码。"]
MATH_ASKS = ["Can you solve these problems step by step?", "Please help me with my homework.",
             "Show me how to work out these problems.", "请一步一步地解这几道题。"]
FOLLOWUPS = ["Thanks! Can you give me another one?", "Great, one more please.",
             "That helps. What else can you show me?", "谢谢！能再来一个吗？"]
CODE_INTROS = ["Sure. Here is an example:", "Here you go:", "Of course. This should help:"]
MATH_INTROS = ["Sure, let us work through them one at a time.", "Here are the worked solutions.",
               "好的，我们一步一步来。"]


def _turn(rng: random.Random) -> tuple[str, str]:
    """One (user, assistant) pair on a random subject."""
    kind = rng.choice(["en", "en", "zh", "code", "math"])
    if kind == "en":
        gen = rng.choice(list(EN_ASKS))
        return rng.choice(EN_ASKS[gen]), "\n\n".join(gen(rng))
    if kind == "zh":
        gen = rng.choice(list(ZH_ASKS))
        return rng.choice(ZH_ASKS[gen]), "\n\n".join(gen(rng))
    if kind == "code":
        body = "\n\n".join(code.paragraphs(rng)[:2])
        return rng.choice(CODE_ASKS), f"{rng.choice(CODE_INTROS)}\n\n```\n{body}\n```"
    body = "\n\n".join(mathprob.paragraphs(rng))
    return rng.choice(MATH_ASKS), f"{rng.choice(MATH_INTROS)}\n\n{body}"


def start(rng: random.Random) -> list[dict]:
    """A one-turn conversation, with a system message half of the time."""
    messages = []
    if rng.random() < 0.5:
        messages.append({"role": "system", "content": rng.choice(SYSTEMS)})
    add_turn(rng, messages)
    return messages


def add_turn(rng: random.Random, messages: list[dict]) -> None:
    """Append a user/assistant pair; later user turns are often short follow-ups."""
    user, answer = _turn(rng)
    if any(m["role"] == "user" for m in messages) and rng.random() < 0.5:
        user = rng.choice(FOLLOWUPS)
    messages.append({"role": "user", "content": user})
    messages.append({"role": "assistant", "content": answer})


def render_plain(messages: list[dict]) -> str:
    """ChatML markup as literal text (no default system prompt added), for training texts."""
    return "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages)
