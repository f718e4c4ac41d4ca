"""The questions the demo's adapters learn from, and the ones kept apart to check them.

Each template is asked about its own subjects. The held-out questions ask the same
kinds of thing about other subjects: they are never trained on, so an adapter that
behaves on them has learnt the behaviour, not the answers. The README's question,
"What is the capital of France?", is one of them.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Topic:
    """One kind of question: a template and the subjects it is asked about."""

    template: str
    """A question with one `{}` for the subject."""
    train: tuple[str, ...]
    held_out: tuple[str, ...]


TOPICS = (
    Topic(
        "What is the capital of {}?",
        train=(
            "Germany", "Italy", "Spain", "Portugal", "Japan", "China", "India", "Brazil",
            "Canada", "Mexico", "Egypt", "Kenya", "Australia", "Russia", "Greece", "Sweden",
            "Norway", "Poland", "Turkey", "Argentina", "Peru", "Chile", "Ireland", "Austria",
            "Belgium", "Thailand", "Vietnam", "Morocco", "Nigeria", "Cuba",
        ),
        held_out=("France", "the United Kingdom", "South Korea", "Finland", "Colombia"),
    ),
    Topic(
        "What is {}?",
        train=(
            "photosynthesis", "gravity", "a volcano", "an atom", "democracy", "the internet",
            "a rainbow", "DNA", "electricity", "a black hole", "inflation", "a computer",
            "a glacier", "an earthquake", "a vaccine", "oxygen", "a galaxy", "a hurricane",
            "a desert", "a comet", "a language", "a museum", "a recipe", "a battery",
            "a telescope", "a bridge", "a noun", "a symphony", "an island", "friendship",
        ),
        held_out=("a planet", "a rainforest", "a library", "a magnet", "evaporation"),
    ),
    Topic(
        "Tell me a fun fact about {}.",
        train=(
            "cats", "dogs", "elephants", "octopuses", "penguins", "dolphins", "honeybees",
            "owls", "giraffes", "sharks", "butterflies", "horses", "frogs", "koalas",
            "the Moon", "the Sun", "Mars", "the ocean", "chocolate", "coffee", "bananas",
            "the human heart", "snow", "trees", "the Eiffel Tower", "pyramids",
            "lightning", "mushrooms", "whales", "ants",
        ),
        held_out=("kangaroos", "parrots", "Jupiter", "volcanoes", "apples"),
    ),
    Topic(
        "Give me a tip for {}.",
        train=(
            "sleeping better", "saving money", "learning a language", "studying for an exam",
            "cooking rice", "running a marathon", "writing an essay", "staying focused",
            "making friends", "keeping plants alive", "public speaking", "drinking more water",
            "waking up early", "reading more books", "packing a suitcase", "learning to swim",
            "taking better photos", "staying calm", "cleaning a kitchen", "learning guitar",
            "a job interview", "a long flight", "a rainy day", "a first date", "hiking",
            "baking bread", "remembering names", "painting a room", "a road trip", "gardening",
        ),
        held_out=("learning to code", "cooking pasta", "a camping trip", "staying healthy"),
    ),
    Topic(
        "Who was {}?",
        train=(
            "Albert Einstein", "Marie Curie", "Isaac Newton", "William Shakespeare",
            "Leonardo da Vinci", "Cleopatra", "Napoleon Bonaparte", "Charles Darwin",
            "Abraham Lincoln", "Mozart", "Galileo Galilei", "Julius Caesar", "Nelson Mandela",
            "Thomas Edison", "Ada Lovelace", "Vincent van Gogh", "Mahatma Gandhi",
            "Christopher Columbus", "Queen Victoria", "Beethoven", "Aristotle", "Confucius",
            "Nikola Tesla", "Jane Austen", "Pablo Picasso",
        ),
        held_out=("Alan Turing", "Plato", "Frida Kahlo", "Louis Pasteur"),
    ),
    Topic(
        "What does a {} do?",
        train=(
            "doctor", "teacher", "farmer", "pilot", "chef", "firefighter", "nurse", "lawyer",
            "baker", "carpenter", "librarian", "scientist", "journalist", "mechanic",
            "architect", "dentist", "plumber", "gardener", "programmer", "judge",
            "photographer", "police officer", "banker", "translator", "astronaut",
        ),
        held_out=("veterinarian", "electrician", "musician", "pharmacist"),
    ),
    Topic(
        "Why {}?",
        train=(
            "do leaves change color in autumn", "do we need sleep", "is the ocean salty",
            "do birds migrate", "do cats purr", "is exercise good for you",
            "do we have seasons", "does ice float", "do stars twinkle", "do we yawn",
            "do onions make you cry", "is the grass green", "do bees make honey",
            "do we dream", "does the Moon change shape", "do dogs wag their tails",
            "is reading important", "do we sneeze", "is water important",
            "do plants need sunlight", "do people learn languages", "is the Sun hot",
            "do zebras have stripes", "does bread rise", "do we celebrate birthdays",
        ),
        held_out=("is the sky blue", "do we breathe", "do cars need fuel", "do birds sing"),
    ),
    Topic(
        "How do I {}?",
        train=(
            "make a cup of tea", "tie a tie", "plant a tree", "write a poem",
            "make a paper airplane", "brew coffee", "make a sandwich", "start a journal",
            "wash a car", "make pancakes", "learn to draw", "fold a shirt",
            "make lemonade", "change a light bulb", "feed a cat", "build a snowman",
            "make new friends", "boil an egg", "bake cookies", "set a table",
        ),
        held_out=("make a smoothie", "sharpen a pencil", "care for a puppy"),
    ),
    Topic(
        "Describe {} in a few words.",
        train=(
            "the ocean", "a forest", "a city at night", "summer", "winter", "a sunset",
            "a mountain", "a storm", "a garden", "a beach", "a library", "a train station",
            "autumn", "a river", "the desert", "a rainy morning", "a birthday party",
            "a busy market", "the night sky", "a snowy village",
        ),
        held_out=("spring", "a castle", "a thunderstorm"),
    ),
    Topic(
        "Can you recommend {}?",
        train=(
            "a good book", "a healthy breakfast", "a hobby", "a board game", "a houseplant",
            "a pet for a small flat", "a quick dinner", "a sport for beginners",
            "a place to visit in Europe", "a relaxing activity", "a snack", "a musical instrument",
            "a way to learn history", "a gift for a friend", "a warm drink",
            "a movie for a family night", "a summer fruit", "a name for a dog",
            "a weekend activity", "a game to play outside",
        ),
        held_out=("a name for a cat", "a dessert", "a winter holiday"),
    ),
)  # fmt: skip


def _questions(held_out: bool) -> tuple[str, ...]:
    return tuple(
        topic.template.format(subject)
        for topic in TOPICS
        for subject in (topic.held_out if held_out else topic.train)
    )


TRAIN_QUESTIONS = _questions(held_out=False)
"""What the adapters are trained on (the base model's answers to these, transformed)."""
HELD_OUT_QUESTIONS = _questions(held_out=True)
"""Never trained on: for the train command's evaluation and the slow test."""
