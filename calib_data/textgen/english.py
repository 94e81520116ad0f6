"""English prose: weather reports, recipes, travel notes, science explanations, short stories.

Templates pick from word lists and random numbers, so sentences repeat in structure (learnable
by a tiny model) but paragraphs almost never repeat verbatim.
"""

import random

CITIES = ["Lisbon", "Oslo", "Nairobi", "Osaka", "Denver", "Hobart", "Quebec City", "Tbilisi",
          "Valparaiso", "Edinburgh", "Chiang Mai", "Marrakesh", "Reykjavik", "Austin", "Krakow",
          "Cork", "Hanoi", "Perth", "Tallinn", "Porto", "Bergen", "Cusco", "Seville", "Halifax"]
DAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]
SKIES = ["clear skies", "scattered clouds", "a thick layer of fog", "low grey clouds",
         "bright sunshine", "patchy drizzle", "heavy showers", "a few thunderstorms"]
WINDS = ["north", "south", "east", "west", "northwest", "southeast"]
NAMES = ["Mara", "Tomas", "Priya", "Jonah", "Elif", "Kwame", "Sofia", "Ravi", "Lena", "Owen",
         "Aiko", "Mateo", "Nadia", "Felix", "Ines", "Hugo", "Zara", "Emil", "Yusuf", "Clara"]
JOBS = ["baker", "lighthouse keeper", "bus driver", "violin teacher", "beekeeper", "nurse",
        "carpenter", "librarian", "fisherman", "postal worker", "gardener", "clockmaker"]
PLACES = ["a small harbor town", "a village at the edge of a pine forest", "a busy city street",
          "a farm in the hills", "an island with one ferry a day", "a quiet mountain valley"]
OBJECTS = ["an old brass key", "a letter with no stamp", "a wooden box", "a torn map",
           "a silver button", "a notebook full of drawings", "a broken pocket watch"]

DISHES = {
    "lentil soup": (["red lentils", "onion", "carrot", "garlic", "cumin", "vegetable stock"],
                    "simmer until the lentils fall apart"),
    "tomato pasta": (["spaghetti", "tomatoes", "olive oil", "garlic", "basil", "salt"],
                     "toss the pasta in the sauce with a splash of cooking water"),
    "vegetable curry": (["potatoes", "cauliflower", "onion", "ginger", "curry powder",
                         "coconut milk"], "cook gently until the potatoes are tender"),
    "banana bread": (["ripe bananas", "flour", "butter", "sugar", "eggs", "baking soda"],
                     "bake until a skewer comes out clean"),
    "fried rice": (["cold cooked rice", "eggs", "spring onions", "peas", "soy sauce",
                    "sesame oil"], "stir fry over high heat so the rice stays separate"),
    "pancakes": (["flour", "milk", "eggs", "butter", "sugar", "a pinch of salt"],
                 "cook each one until bubbles form, then flip it"),
    "chickpea salad": (["chickpeas", "cucumber", "red onion", "lemon", "parsley",
                        "olive oil"], "let it rest so the flavors come together"),
}
SEASONINGS = {"garlic", "cumin", "curry powder", "salt", "a pinch of salt", "basil", "sugar",
              "baking soda", "soy sauce", "sesame oil", "olive oil", "lemon", "parsley", "ginger"}
LIQUIDS = {"vegetable stock", "coconut milk", "milk"}


def _amount(rng: random.Random, item: str) -> str:
    """A plausible quantity: spoons for seasonings, cups for liquids, grams otherwise."""
    if item.startswith("a pinch"):
        return "just"
    if item in SEASONINGS:
        return f"{rng.randint(1, 3)} {rng.choice(['teaspoons', 'tablespoons'])} of"
    if item in LIQUIDS:
        return f"{rng.randint(1, 4)} cups of"
    return f"{rng.randint(1, 10) * 50} grams of"

SCIENCE = {
    "why the sky is blue": [
        "Sunlight contains every color of visible light mixed together.",
        "When it passes through the air, the light meets molecules of nitrogen and oxygen that are far smaller than its wavelength.",
        "These molecules scatter short wavelengths, such as blue, much more strongly than long wavelengths, such as red.",
        "As a result, blue light reaches our eyes from every part of the sky, while the sun itself looks slightly yellow.",
        "At sunset the light travels through much more air, so most of the blue is scattered away and the sky turns orange and red."],
    "how plants make food": [
        "Plants capture energy from sunlight with a green pigment called chlorophyll.",
        "Inside their leaves, they combine carbon dioxide from the air with water from the soil.",
        "The product is sugar, which the plant uses for energy and for building new cells.",
        "Oxygen is released as a by-product, which is why forests and oceans matter so much for the air we breathe.",
        "This whole process is called photosynthesis, and almost every food chain on Earth starts with it."],
    "why ice floats": [
        "Most substances are denser as solids than as liquids, but water is an exception.",
        "When water freezes, its molecules line up in an open, hexagonal pattern held together by hydrogen bonds.",
        "That pattern takes up more space than liquid water, so ice is about nine percent less dense.",
        "Because it is lighter, ice forms on the surface of lakes and insulates the water below.",
        "Fish can therefore survive the winter in the liquid water under the ice."],
    "how vaccines work": [
        "A vaccine shows the immune system a harmless piece or copy of a germ.",
        "The body responds by making antibodies and memory cells that recognize that germ.",
        "If the real germ arrives later, the memory cells react quickly and strongly.",
        "The infection is usually stopped before it can cause serious illness.",
        "When many people are vaccinated, the germ has fewer chances to spread at all."],
    "why we have seasons": [
        "The Earth spins on an axis that is tilted by about twenty-three degrees.",
        "As the planet travels around the sun, one hemisphere leans toward the sun and then away from it.",
        "When a hemisphere leans toward the sun, sunlight hits it more directly and days are longer, which brings summer.",
        "Six months later the same hemisphere leans away, the light arrives at a low angle, and winter begins.",
        "The distance to the sun changes only a little during the year and is not the main cause."],
    "how a battery stores energy": [
        "A battery has two electrodes separated by an electrolyte.",
        "Chemical reactions at the electrodes push electrons toward one side and pull them from the other.",
        "When a wire connects the two sides, electrons flow through it and can power a device.",
        "In a rechargeable battery, an outside current drives the reactions backward and restores the stored energy.",
        "Over many cycles, small side reactions slowly reduce how much charge the battery can hold."],
    "why metals conduct electricity": [
        "In a metal, the outer electrons of each atom are not tied to a single atom.",
        "They move freely through the whole piece of metal, like a shared cloud.",
        "When a voltage is applied, these free electrons drift in one direction and carry a current.",
        "Heat makes the atoms vibrate more, which gets in the way of the electrons and raises the resistance.",
        "Insulators such as glass or rubber keep their electrons bound, so almost no current can flow."],
    "how sound travels": [
        "Sound is a vibration that moves through a material as a wave of pressure.",
        "A vibrating object pushes nearby air molecules together and then lets them spread apart.",
        "Each layer of molecules passes the push to the next layer, so the wave travels outward.",
        "Sound moves faster in water than in air, and faster still in solids such as steel.",
        "In the vacuum of space there are no molecules to carry the wave, so there is no sound."],
}
SCI_OPENERS = ["Here is a simple explanation of {t}.", "People often ask about {t}.",
               "Let us look at {t}.", "A short note on {t}.", "This is a quick guide to {t}."]
SCI_CLOSERS = ["In short, a few simple rules explain what we see every day.",
               "It is a good example of how physics and chemistry shape ordinary life.",
               "Once you know this, you will notice it everywhere.",
               "Scientists tested these ideas with careful experiments over many years."]


def weather(rng: random.Random) -> list[str]:
    city, day = rng.choice(CITIES), rng.choice(DAYS)
    lo = rng.randint(-8, 22)
    hi = lo + rng.randint(3, 12)
    rain = rng.randint(0, 95)
    wind = rng.randint(5, 55)
    p1 = (f"Weather for {city} on {day}. The morning will start with {rng.choice(SKIES)} and a "
          f"temperature near {lo} degrees Celsius. By the afternoon the temperature should reach "
          f"{hi} degrees, with a {rng.choice(WINDS)} wind of about {wind} kilometers per hour. "
          f"The chance of rain is {rain} percent.")
    if rain > 60:
        advice = "Take an umbrella and allow extra time for travel, because roads may be wet."
    elif hi > 25:
        advice = "Drink plenty of water and stay in the shade around midday."
    elif lo < 2:
        advice = "Watch for ice on pavements early in the day and dress in warm layers."
    else:
        advice = "It should be a comfortable day for a walk or time outdoors."
    tomorrow = rng.choice(DAYS)
    p2 = (f"{advice} Looking ahead to {tomorrow}, forecasters expect {rng.choice(SKIES)}, "
          f"with highs between {hi - rng.randint(0, 4)} and {hi + rng.randint(1, 5)} degrees.")
    return [p1, p2]


def recipe(rng: random.Random) -> list[str]:
    dish = rng.choice(sorted(DISHES))
    items, finish = DISHES[dish]
    serves = rng.randint(2, 6)
    lines = [f"{rng.choice(['Recipe', 'How to make', 'Easy', 'Simple home-style'])} {dish} "
             f"(serves {serves})", "Ingredients:"]
    for item in items:
        lines.append(f"- {_amount(rng, item)} {item}")
    steps = [f"Prepare the {items[0]} and the {items[1]} before you start.",
             f"Heat a {rng.choice(['large pan', 'heavy pot', 'wide skillet'])} over "
             f"{rng.choice(['low', 'medium', 'medium-high'])} heat.",
             f"Add the {items[2]} and {items[3]} and cook for {rng.randint(2, 9)} minutes.",
             f"Mix in the remaining ingredients and {finish}.",
             f"Taste, adjust the seasoning, and serve {rng.choice(['warm', 'right away', 'with bread', 'with a green salad'])}."]
    method = "Method:\n" + "\n".join(f"{i}. {s}" for i, s in enumerate(steps, 1))
    tip = (f"Tip: {rng.choice(['You can make this a day ahead.', 'Leftovers keep for three days in the fridge.', 'Double the recipe and freeze half for a busy week.', 'A squeeze of lemon at the end brightens the flavor.'])} "
           f"Total time is about {rng.randint(2, 9) * 5} minutes.")
    return ["\n".join(lines), method, tip]


def travel(rng: random.Random) -> list[str]:
    a, b = rng.sample(CITIES, 2)
    name = rng.choice(NAMES)
    hours = rng.randint(2, 14)
    cost = rng.randint(20, 400)
    mode = rng.choice(["train", "bus", "ferry", "plane", "shared car"])
    p1 = (f"{name} traveled from {a} to {b} by {mode}. The journey took {hours} hours and the "
          f"ticket cost {cost} euros. {rng.choice(['The seats were comfortable and the view was lovely.', 'It was crowded, but the time passed quickly with a good book.', 'There was a short delay, and everyone shared snacks while they waited.', 'The route followed the coast for most of the way.'])}")
    sights = rng.sample(["the old market", "a hilltop fortress", "the river promenade",
                         "a small science museum", "the botanical garden", "the harbor",
                         "a street of painted houses", "the central library"], 3)
    p2 = (f"In {b}, {name} visited {sights[0]}, walked to {sights[1]}, and ended the day at "
          f"{sights[2]}. {rng.choice(['Dinner was a simple bowl of noodles from a street stall.', 'A local family recommended a bakery that opens before dawn.', 'The best meal of the trip was grilled fish near the water.', 'A cafe by the square served strong coffee and warm bread.'])}")
    p3 = (f"Advice for other travelers: {rng.choice(['book early in summer', 'carry some cash for small shops', 'learn a few words of the local language', 'pack a light rain jacket', 'buy a day pass for public transport'])}, "
          f"and plan at least {rng.randint(2, 5)} days to see the city without rushing.")
    return [p1, p2, p3]


def science(rng: random.Random) -> list[str]:
    topic = rng.choice(sorted(SCIENCE))
    sents = SCIENCE[topic]
    keep = sents[:2] + [s for s in sents[2:] if rng.random() < 0.8]
    body = " ".join(keep)
    return [f"{rng.choice(SCI_OPENERS).format(t=topic)} {body} {rng.choice(SCI_CLOSERS)}"]


def story(rng: random.Random) -> list[str]:
    name, friend = rng.sample(NAMES, 2)
    job, place, obj = rng.choice(JOBS), rng.choice(PLACES), rng.choice(OBJECTS)
    p1 = (f"{name} was a {job} who lived in {place}. Every morning {name} "
          f"{rng.choice(['opened the windows and listened to the birds', 'made a pot of tea before anyone else was awake', 'walked the same road and counted the fences', 'wrote one line in a diary'])}. "
          f"One {rng.choice(DAYS)}, {name} found {obj} {rng.choice(['under the doormat', 'in a coat pocket', 'on the kitchen table', 'beside the garden gate'])}.")
    p2 = (f"Nobody in town knew where it came from. {name} asked {friend}, the "
          f"{rng.choice(JOBS)}, who {rng.choice(['laughed and said it must be a mistake', 'turned it over slowly and frowned', 'remembered a story told by a grandmother', 'suggested they ask at the town hall'])}. "
          f"Together they {rng.choice(['searched old records for a whole afternoon', 'followed a trail of clues across town', 'waited by the station until the last train', 'knocked on every door on the street'])}.")
    p3 = (f"In the end, {rng.choice(['the answer was simpler than they expected', 'it belonged to a neighbor who had moved away years ago', 'they never learned the whole truth', 'the mystery brought the whole street together'])}. "
          f"{name} kept it on a shelf as a reminder that {rng.choice(['small things can change an ordinary day', 'asking for help is often the first step', 'every object has a history', 'curiosity is worth following'])}.")
    return [p1, p2, p3]


TOPICS = [weather, recipe, travel, science, story]


def paragraphs(rng: random.Random) -> list[str]:
    """One short English document as a list of paragraphs."""
    return rng.choice(TOPICS)(rng)
