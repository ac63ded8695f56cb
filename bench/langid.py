"""Language ID accuracy and speed of lingua (the detector `lmforge.data.langid` builds), low- vs
high-accuracy mode, on short samples written for this check: 47 sentences in 19 languages and
28 phrases of 2-6 words. Each mode runs in a fresh process so model loading is measured.

    python bench/langid.py            # ~15 s on 2 cores
"""

from __future__ import annotations

import json
import resource
import subprocess
import sys
import time

SENTENCES = [
    ("en", "The weather was cold, so we stayed inside and read books all afternoon."),
    ("en", "Returns the number of items that match the given predicate."),
    ("en", "Open the file, read every line and close it when you are done."),
    ("en", "She said that the meeting would start later than planned."),
    ("en", "This function is deprecated; use the new parser instead."),
    ("fr", "Le temps était froid, alors nous sommes restés à l'intérieur pour lire."),
    ("fr", "La réunion commencera plus tard que prévu, selon la directrice."),
    ("fr", "Ouvrez le fichier, lisez chaque ligne puis fermez-le."),
    ("fr", "Cette fonction renvoie le nombre d'éléments qui correspondent."),
    ("fr", "Nous avons mangé une tarte aux pommes chez ma grand-mère."),
    ("de", "Das Wetter war kalt, also blieben wir drinnen und lasen Bücher."),
    ("de", "Die Besprechung beginnt später als geplant, sagte die Leiterin."),
    ("de", "Öffnen Sie die Datei und lesen Sie jede Zeile."),
    ("de", "Diese Funktion gibt die Anzahl der passenden Elemente zurück."),
    ("es", "El tiempo era frío, así que nos quedamos en casa leyendo libros."),
    ("es", "La reunión empezará más tarde de lo previsto, dijo la directora."),
    ("es", "Abra el archivo, lea cada línea y ciérrelo al terminar."),
    ("es", "Esta función devuelve el número de elementos que coinciden."),
    ("it", "Il tempo era freddo, quindi siamo rimasti in casa a leggere libri."),
    ("it", "La riunione inizierà più tardi del previsto, ha detto la direttrice."),
    ("it", "Questa funzione restituisce il numero di elementi corrispondenti."),
    ("pt", "O tempo estava frio, então ficamos em casa lendo livros."),
    ("pt", "A reunião vai começar mais tarde do que o previsto, disse a diretora."),
    ("pt", "Esta função devolve o número de elementos que correspondem."),
    ("nl", "Het weer was koud, dus bleven we binnen en lazen we boeken."),
    ("nl", "De vergadering begint later dan gepland, zei de directrice."),
    ("ru", "Погода была холодной, поэтому мы остались дома и читали книги."),
    ("ru", "Эта функция возвращает количество подходящих элементов."),
    ("zh", "天气很冷，所以我们整个下午都待在家里看书。"),
    ("zh", "会议将比原计划晚一些开始，主任说。"),
    ("zh", "打开文件，读取每一行，然后关闭它。"),
    ("zh", "这个函数返回满足条件的元素数量。"),
    ("zh", "我们在奶奶家吃了苹果派。"),
    ("zh", "数据"),
    ("ja", "天気が寒かったので、午後はずっと家で本を読んでいました。"),
    ("ja", "会議は予定より遅れて始まると部長が言いました。"),
    ("ja", "ファイルを開いて、各行を読み、最後に閉じてください。"),
    ("ja", "この関数は条件に一致する要素の数を返します。"),
    ("ko", "날씨가 추워서 우리는 오후 내내 집에서 책을 읽었다."),
    ("ko", "회의는 예정보다 늦게 시작될 것이라고 부장이 말했다."),
    ("ko", "파일을 열고 각 줄을 읽은 다음 닫으세요."),
    ("ko", "이 함수는 조건에 맞는 요소의 개수를 반환한다."),
    ("ar", "كان الطقس باردا لذلك بقينا في المنزل نقرأ الكتب."),
    ("hi", "मौसम ठंडा था, इसलिए हम घर पर रहे और किताबें पढ़ीं।"),
    ("sv", "Vädret var kallt, så vi stannade inne och läste böcker."),
    ("pl", "Pogoda była zimna, więc zostaliśmy w domu i czytaliśmy książki."),
    ("tr", "Hava soğuktu, bu yüzden evde kalıp kitap okuduk."),
]
PHRASES = [
    ("en", "read the file"),
    ("en", "good morning everyone"),
    ("en", "see the docs"),
    ("en", "the cat sat on the mat"),
    ("fr", "lire le fichier"),
    ("fr", "bonjour à tous"),
    ("fr", "voir la documentation"),
    ("fr", "le chat est sur le tapis"),
    ("de", "die Datei lesen"),
    ("de", "guten Morgen zusammen"),
    ("de", "siehe die Dokumentation"),
    ("de", "die Katze sitzt auf der Matte"),
    ("es", "leer el archivo"),
    ("es", "buenos días a todos"),
    ("es", "ver la documentación"),
    ("es", "el gato está en la alfombra"),
    ("it", "leggere il file"),
    ("it", "buongiorno a tutti"),
    ("pt", "ler o arquivo"),
    ("pt", "bom dia a todos"),
    ("nl", "het bestand lezen"),
    ("nl", "goedemorgen allemaal"),
    ("zh", "读取文件"),
    ("zh", "大家早上好"),
    ("ja", "ファイルを読む"),
    ("ja", "おはようございます"),
    ("ko", "파일 읽기"),
    ("ko", "안녕하세요 여러분"),
]


def measure(accuracy: str) -> dict:
    from lmforge.data.langid import detect_language

    t0 = time.perf_counter()
    detect_language("warm up: the first call loads the models", accuracy=accuracy)
    load = time.perf_counter() - t0
    out = {"accuracy": accuracy, "load_s": round(load, 2)}
    for name, samples in (("sentences", SENTENCES), ("phrases", PHRASES)):
        wrong = [(lang, detect_language(text, accuracy=accuracy)[0], text) for lang, text in samples]
        wrong = [w for w in wrong if w[0] != w[1]]
        t0 = time.perf_counter()
        for _ in range(5):
            for _, text in samples:
                detect_language(text, accuracy=accuracy)
        ms = (time.perf_counter() - t0) / (5 * len(samples)) * 1e3
        out[name] = {
            "correct": len(samples) - len(wrong),
            "of": len(samples),
            "ms_per_text": round(ms, 3),
            "wrong": wrong,
        }
    out["max_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    return out


def main() -> None:
    if len(sys.argv) > 2 and sys.argv[1] == "--worker":
        print(json.dumps(measure(sys.argv[2])))
        return
    for accuracy in ("low", "high"):
        r = json.loads(
            subprocess.run(
                [sys.executable, __file__, "--worker", accuracy], check=True, capture_output=True, text=True
            ).stdout
        )
        s, p = r["sentences"], r["phrases"]
        print(
            f"{accuracy:>4}: sentences {s['correct']}/{s['of']} ({s['ms_per_text']} ms each), phrases "
            f"{p['correct']}/{p['of']} ({p['ms_per_text']} ms), first-call load {r['load_s']} s, "
            f"peak RSS {r['max_rss_mb']} MB; wrong: {s['wrong'] + p['wrong']}"
        )


if __name__ == "__main__":
    main()
