"""Worked math problems: arithmetic, percent, linear equations, units, averages, areas.

Every answer is computed here (integers or ``Fraction``), never typed by hand, and each
solution is written step by step so a model sees the arithmetic, not just the result.
"""

import random
from fractions import Fraction

NAMES = ["Ana", "Ben", "Chen", "Dara", "Eli", "Femi", "Gita", "Hana", "Ivan", "Jia"]
GOODS = [("pencils", 3), ("apples", 2), ("notebooks", 7), ("tickets", 12), ("stamps", 1)]


def fmt(x) -> str:
    """Show a Fraction as an integer or a decimal with at most two places."""
    x = Fraction(x)
    if x.denominator == 1:
        return str(x.numerator)
    s = f"{float(x):.2f}".rstrip("0").rstrip(".")
    return s if Fraction(s) == x else f"{s} (approximately)"


def shopping(rng: random.Random) -> list[str]:
    name = rng.choice(NAMES)
    (g1, p1), (g2, p2) = rng.sample(GOODS, 2)
    n1, n2 = rng.randint(2, 12), rng.randint(2, 12)
    paid = (n1 * p1 + n2 * p2) // 10 * 10 + rng.choice([10, 20, 50])
    c1, c2 = n1 * p1, n2 * p2
    q = (f"Problem: {name} buys {n1} {g1} at {p1} dollars each and {n2} {g2} at {p2} dollars "
         f"each, and pays with {paid} dollars. How much change does {name} get?")
    a = (f"Solution:\nStep 1: {n1} x {p1} = {c1} dollars for the {g1}.\n"
         f"Step 2: {n2} x {p2} = {c2} dollars for the {g2}.\n"
         f"Step 3: Total cost = {c1} + {c2} = {c1 + c2} dollars.\n"
         f"Step 4: Change = {paid} - {c1 + c2} = {paid - c1 - c2} dollars.\n"
         f"Answer: {paid - c1 - c2} dollars.")
    return [q, a]


def percent(rng: random.Random) -> list[str]:
    price = rng.randint(4, 60) * 5
    off = rng.choice([10, 15, 20, 25, 30, 40, 50])
    tax = rng.choice([0, 5, 8, 10])
    disc = Fraction(price * off, 100)
    after = price - disc
    q = (f"Problem: A jacket costs {price} dollars. It is on sale for {off}% off"
         + (f", and then a {tax}% sales tax is added." if tax else ".")
         + " What is the final price?")
    steps = [f"Step 1: Discount = {off}% of {price} = {price} x {off} / 100 = {fmt(disc)} dollars.",
             f"Step 2: Sale price = {price} - {fmt(disc)} = {fmt(after)} dollars."]
    final = after
    if tax:
        t = after * Fraction(tax, 100)
        final = after + t
        steps.append(f"Step 3: Tax = {tax}% of {fmt(after)} = {fmt(t)} dollars, so the final "
                     f"price is {fmt(after)} + {fmt(t)} = {fmt(final)} dollars.")
    return [q, "Solution:\n" + "\n".join(steps) + f"\nAnswer: {fmt(final)} dollars."]


def linear(rng: random.Random) -> list[str]:
    x = rng.randint(-12, 15)
    a = rng.choice([i for i in range(-9, 10) if i not in (0, 1)])
    b = rng.randint(-30, 30)
    c = a * x + b
    sign = "+" if b >= 0 else "-"
    q = f"Problem: Solve for x: {a}x {sign} {abs(b)} = {c}."
    move = "Subtract" if b >= 0 else "Add"
    a_txt = (f"Solution:\nStep 1: {move} {abs(b)} on both sides: {a}x = {c} {'-' if b >= 0 else '+'} "
             f"{abs(b)} = {c - b}.\nStep 2: Divide both sides by {a}: x = {c - b} / {a} = {x}.\n"
             f"Check: {a} x {x} {sign} {abs(b)} = {a * x} {sign} {abs(b)} = {c}. Correct.\n"
             f"Answer: x = {x}.")
    return [q, a_txt]


def units(rng: random.Random) -> list[str]:
    kind = rng.choice(["km", "kg", "time", "temp"])
    if kind == "km":
        km = Fraction(rng.randint(5, 400), 10)
        q = f"Problem: Convert {fmt(km)} kilometers to meters and to centimeters."
        a = (f"Solution:\nStep 1: 1 kilometer = 1000 meters, so {fmt(km)} km = {fmt(km * 1000)} m.\n"
             f"Step 2: 1 meter = 100 centimeters, so {fmt(km * 1000)} m = {fmt(km * 100000)} cm.\n"
             f"Answer: {fmt(km * 1000)} m, or {fmt(km * 100000)} cm.")
    elif kind == "kg":
        g = rng.randint(150, 9000)
        q = f"Problem: A bag of flour weighs {g} grams. How many kilograms is that?"
        a = (f"Solution:\nStep 1: 1000 grams = 1 kilogram.\n"
             f"Step 2: {g} / 1000 = {fmt(Fraction(g, 1000))}.\nAnswer: {fmt(Fraction(g, 1000))} kg.")
    elif kind == "time":
        mins = rng.randint(70, 1000)
        q = f"Problem: A train trip lasts {mins} minutes. Write this in hours and minutes."
        a = (f"Solution:\nStep 1: {mins} / 60 = {mins // 60} with remainder {mins % 60}.\n"
             f"Step 2: So the trip is {mins // 60} hours and {mins % 60} minutes.\n"
             f"Answer: {mins // 60} h {mins % 60} min.")
    else:
        c = rng.randint(-20, 45)
        f = Fraction(c * 9, 5) + 32
        q = f"Problem: Convert {c} degrees Celsius to Fahrenheit."
        a = (f"Solution:\nStep 1: F = C x 9 / 5 + 32.\nStep 2: {c} x 9 / 5 = {fmt(Fraction(c * 9, 5))}.\n"
             f"Step 3: {fmt(Fraction(c * 9, 5))} + 32 = {fmt(f)}.\nAnswer: {fmt(f)} degrees Fahrenheit.")
    return [q, a]


def average(rng: random.Random) -> list[str]:
    name = rng.choice(NAMES)
    scores = [rng.randint(50, 100) for _ in range(rng.randint(3, 6))]
    total = sum(scores)
    mean = Fraction(total, len(scores))
    q = f"Problem: {name} scored {', '.join(map(str, scores))} on {len(scores)} tests. What is the average score?"
    a = (f"Solution:\nStep 1: Add the scores: {' + '.join(map(str, scores))} = {total}.\n"
         f"Step 2: Divide by the number of tests: {total} / {len(scores)} = {fmt(mean)}.\n"
         f"Answer: {fmt(mean)}.")
    return [q, a]


def area(rng: random.Random) -> list[str]:
    w, h = rng.randint(2, 40), rng.randint(2, 40)
    q = f"Problem: A rectangular garden is {w} meters wide and {h} meters long. Find its area and perimeter."
    a = (f"Solution:\nStep 1: Area = width x length = {w} x {h} = {w * h} square meters.\n"
         f"Step 2: Perimeter = 2 x (width + length) = 2 x ({w} + {h}) = 2 x {w + h} = {2 * (w + h)} meters.\n"
         f"Answer: area {w * h} square meters, perimeter {2 * (w + h)} meters.")
    return [q, a]


def zh_problem(rng: random.Random) -> list[str]:
    n, p = rng.randint(3, 15), rng.randint(2, 20)
    paid = n * p // 10 * 10 + rng.choice([10, 20, 50, 100])
    q = f"题目：一支笔{p}元，小明买了{n}支，付了{paid}元，应该找回多少钱？"
    a = (f"解答：\n第一步：{n}支笔的总价是 {n} × {p} = {n * p} 元。\n"
         f"第二步：找回的钱是 {paid} - {n * p} = {paid - n * p} 元。\n答：应找回{paid - n * p}元。")
    return [q, a]


PROBLEMS = [shopping, percent, linear, units, average, area, zh_problem]


def paragraphs(rng: random.Random) -> list[str]:
    """Two or three worked problems in a row, like a page of exercises."""
    out = []
    for _ in range(rng.randint(2, 3)):
        out.extend(rng.choice(PROBLEMS)(rng))
    return out
