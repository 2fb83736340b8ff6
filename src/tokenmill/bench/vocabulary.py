"""Words that synthetic prompts and the mock server's outputs are made of.

Common English words, each a single token or two in every BPE vocabulary seen
(GPT-2, Llama 3, Qwen), so text built from them tokenizes the same way
wherever it is cut between words.
"""

# fmt: off
WORDS: tuple[str, ...] = (
    "the", "of", "and", "to", "in", "is", "was", "for", "on", "that", "with", "as", "by", "at", "from",
    "his", "her", "it", "an", "be", "this", "which", "or", "had", "are", "but", "not", "were", "have",
    "one", "they", "you", "all", "their", "has", "been", "there", "who", "would", "more", "when",
    "will", "if", "no", "out", "so", "said", "what", "up", "its", "about", "into", "than", "them",
    "can", "only", "other", "new", "some", "time", "could", "these", "two", "may", "then", "do",
    "first", "any", "my", "now", "such", "like", "our", "over", "man", "me", "even", "most", "made",
    "after", "also", "did", "many", "before", "must", "through", "back", "years", "where", "much",
    "your", "way", "well", "down", "should", "because", "each", "just", "those", "people", "how", "too",
    "little", "state", "good", "very", "make", "world", "still", "own", "see", "men", "work", "long",
    "get", "here", "between", "both", "life", "being", "under", "never", "day", "same", "another",
    "know", "while", "last", "might", "us", "great", "old", "year", "off", "come", "since", "against",
    "go", "came", "right", "used", "take", "three", "small", "house", "water", "river", "city", "light",
    "stone", "field", "road", "bread", "song", "story", "letter", "market", "garden", "window",
    "morning", "evening", "winter", "summer", "mountain", "forest", "harbor", "bridge", "island",
    "valley", "village", "castle", "engine", "signal", "number", "answer", "question", "order",
)
# fmt: on
