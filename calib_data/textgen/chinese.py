"""Chinese prose: weather, cooking, travel, science explanations and short stories.

Same scheme as the English generator: fixed sentence templates filled from word lists and random
numbers, written for this project in plain modern Chinese.
"""

import random

CITIES = ["北京", "上海", "广州", "成都", "杭州", "西安", "昆明", "哈尔滨", "厦门", "武汉",
          "南京", "青岛", "重庆", "大理", "兰州", "长沙", "苏州", "拉萨"]
SKIES = ["晴朗", "多云", "阴天", "小雨", "中雨", "雷阵雨", "有雾", "小雪"]
WINDS = ["北风", "南风", "东风", "西风", "东北风", "西南风"]
DAYS = ["周一", "周二", "周三", "周四", "周五", "周六", "周日"]
NAMES = ["小明", "小红", "李华", "王芳", "张伟", "陈静", "刘洋", "赵磊", "孙悦", "周涛",
         "吴敏", "郑浩", "林晓", "黄蕾"]
JOBS = ["老师", "医生", "厨师", "司机", "邮递员", "画家", "农民", "工程师", "护士", "图书管理员"]
PLACES = ["一个靠海的小镇", "山脚下的村子", "热闹的老街", "安静的校园", "江边的小城"]
OBJECTS = ["一把旧钥匙", "一封没有署名的信", "一个木头盒子", "一张泛黄的照片", "一只坏掉的怀表"]

DISHES = {
    "西红柿炒鸡蛋": (["西红柿", "鸡蛋", "葱", "盐", "糖"], "把鸡蛋倒回锅里翻炒均匀"),
    "青椒土豆丝": (["土豆", "青椒", "蒜", "醋", "盐"], "大火快炒，让土豆丝保持脆爽"),
    "红烧茄子": (["茄子", "蒜", "酱油", "糖", "淀粉"], "收汁后撒上葱花"),
    "蛋炒饭": (["米饭", "鸡蛋", "胡萝卜", "豌豆", "酱油"], "把米饭炒散，直到每一粒都裹上蛋液"),
    "紫菜蛋花汤": (["紫菜", "鸡蛋", "虾皮", "香油", "盐"], "关火前淋入香油"),
    "凉拌黄瓜": (["黄瓜", "蒜", "醋", "辣椒油", "盐"], "拌匀后放进冰箱冷藏十分钟"),
}

SEASONINGS = {"葱", "盐", "糖", "蒜", "醋", "酱油", "淀粉", "香油", "辣椒油", "虾皮"}
COUNTABLE = {"西红柿", "鸡蛋", "土豆", "青椒", "茄子", "黄瓜", "胡萝卜"}

SCIENCE = {
    "天空为什么是蓝色的": [
        "太阳光里其实包含了各种颜色的光。",
        "阳光穿过大气层时，会碰到许多非常小的气体分子。",
        "这些分子更容易把波长较短的蓝光散射到四面八方。",
        "所以我们无论看向天空的哪个方向，都能看到蓝色。",
        "傍晚时阳光要穿过更厚的空气，蓝光大多被散射掉了，天空就变成了橙红色。"],
    "植物怎样制造养分": [
        "植物的叶子里有一种绿色的物质，叫作叶绿素。",
        "叶绿素能吸收阳光的能量。",
        "植物利用这些能量，把空气中的二氧化碳和根部吸收的水合成糖分。",
        "在这个过程中，植物还会释放出氧气。",
        "这个过程叫作光合作用，它是地球上几乎所有食物链的起点。"],
    "冰为什么会浮在水面上": [
        "大多数物质变成固体以后会变得更紧密，但水是一个例外。",
        "水结冰时，分子会排列成一种比较松散的六边形结构。",
        "因此，同样质量的冰比水占用更多的空间，密度也更小。",
        "冰浮在湖面上，像一层被子一样保护着下面的水。",
        "这样一来，鱼在冬天也能在冰下的水里生活。"],
    "为什么会有四季": [
        "地球的自转轴是倾斜的，倾斜角大约是二十三度。",
        "地球绕着太阳公转时，南北半球会轮流朝向太阳。",
        "朝向太阳的半球受到的光照更直接，白天也更长，于是进入夏天。",
        "半年以后，这个半球背向太阳，阳光斜射，就到了冬天。",
        "地球和太阳之间距离的变化并不是四季形成的主要原因。"],
    "声音是怎样传播的": [
        "声音是由物体振动产生的。",
        "振动的物体推动周围的空气分子，一层一层地传递出去。",
        "声音在水中传播得比在空气中快，在钢铁中传播得更快。",
        "太空中几乎没有空气，所以声音无法传播。",
        "我们的耳朵接收到这些振动，大脑再把它们理解成声音。"],
    "电池是怎样储存能量的": [
        "电池里有正极、负极和电解质。",
        "化学反应让电子聚集在一端，而另一端缺少电子。",
        "用导线把两端连起来，电子就会流动，形成电流。",
        "充电电池可以用外部电流让反应反向进行，把能量重新存起来。",
        "经过很多次充放电，电池能储存的电量会慢慢减少。"],
}
SCI_OPENERS = ["很多人都好奇：{t}？", "今天我们来聊一聊{t}。", "下面简单解释一下{t}。"]
SCI_CLOSERS = ["简单来说，生活中的许多现象都可以用科学来解释。", "了解了这些，你会发现身边处处都有科学。",
               "科学家们通过大量实验，才逐渐弄清楚了其中的道理。"]


def weather(rng: random.Random) -> list[str]:
    city, day = rng.choice(CITIES), rng.choice(DAYS)
    lo = rng.randint(-15, 24)
    hi = lo + rng.randint(3, 11)
    rain = rng.randint(0, 95)
    level = rng.randint(1, 6)
    p1 = (f"{city}{day}天气预报：白天{rng.choice(SKIES)}，夜间{rng.choice(SKIES)}。"
          f"最低气温{lo}摄氏度，最高气温{hi}摄氏度，{rng.choice(WINDS)}{level}级，降水概率{rain}%。")
    if rain > 60:
        tip = "出门请带好雨具，雨天路滑，开车要注意安全。"
    elif hi >= 30:
        tip = "天气炎热，请注意防暑降温，多喝水，尽量避免中午外出。"
    elif lo <= 0:
        tip = "早晚气温很低，路面可能结冰，请注意保暖和出行安全。"
    else:
        tip = "天气比较舒适，适合外出散步和户外活动。"
    p2 = f"温馨提示：{tip}预计未来三天气温变化不大，最高气温在{hi - rng.randint(0, 3)}到{hi + rng.randint(1, 4)}摄氏度之间。"
    return [p1, p2]


def recipe(rng: random.Random) -> list[str]:
    dish = rng.choice(sorted(DISHES))
    items, finish = DISHES[dish]
    people = rng.randint(2, 5)
    lines = [f"{dish}的做法（{people}人份）", "材料："]
    for item in items:
        if item in SEASONINGS:
            amount = rng.choice([f"{rng.randint(1, 3)}勺", "少许", "适量"])
        elif item in COUNTABLE:
            amount = f"{rng.randint(1, 4)}个"
        else:
            amount = f"{rng.randint(1, 8) * 50}克"
        lines.append(f"- {item}{amount}")
    steps = [f"先把{items[0]}和{items[1]}洗干净，切成合适的大小。",
             f"锅里倒油，用{rng.choice(['中火', '大火', '小火'])}烧热。",
             f"放入{items[2]}炒出香味，再加入{items[0]}翻炒{rng.randint(1, 6)}分钟。",
             f"加入{items[3]}和{items[4]}调味，最后{finish}。",
             f"出锅装盘，{rng.choice(['趁热吃味道最好', '配一碗米饭正合适', '一道家常菜就做好了'])}。"]
    method = "做法：\n" + "\n".join(f"{i}. {s}" for i, s in enumerate(steps, 1))
    return ["\n".join(lines), method, f"小贴士：整个过程大约需要{rng.randint(2, 8) * 5}分钟，新手也能轻松完成。"]


def travel(rng: random.Random) -> list[str]:
    a, b = rng.sample(CITIES, 2)
    name = rng.choice(NAMES)
    hours = rng.randint(2, 20)
    cost = rng.randint(80, 1500)
    mode = rng.choice(["高铁", "飞机", "长途汽车", "自驾"])
    sights = rng.sample(["老城区", "博物馆", "夜市", "湖边公园", "古镇", "山顶观景台", "植物园"], 3)
    p1 = (f"{name}坐{mode}从{a}去{b}旅行，路上用了{hours}个小时，花了{cost}元。"
          f"{rng.choice(['一路上风景很美，窗外是一片片的田野。', '车上人很多，但大家都很友好。', '虽然有点累，但心情特别好。'])}")
    p2 = (f"到了{b}以后，{name}先去了{sights[0]}，然后逛了{sights[1]}，晚上又去了{sights[2]}。"
          f"{rng.choice(['当地的小吃很有特色，价格也不贵。', '在一家老店里吃到了地道的面条。', '晚上的街道灯火通明，非常热闹。'])}")
    p3 = (f"给大家的建议：{rng.choice(['最好提前订好住宿', '带一双舒服的鞋', '多尝尝当地的小吃', '避开节假日出行'])}，"
          f"安排{rng.randint(2, 5)}天左右的时间比较合适。")
    return [p1, p2, p3]


def science(rng: random.Random) -> list[str]:
    topic = rng.choice(sorted(SCIENCE))
    sents = SCIENCE[topic]
    keep = sents[:2] + [s for s in sents[2:] if rng.random() < 0.8]
    return [rng.choice(SCI_OPENERS).format(t=topic) + "".join(keep) + rng.choice(SCI_CLOSERS)]


def story(rng: random.Random) -> list[str]:
    name, friend = rng.sample(NAMES, 2)
    job, place, obj = rng.choice(JOBS), rng.choice(PLACES), rng.choice(OBJECTS)
    p1 = (f"{name}是一名{job}，住在{place}。每天早上，{name}都会"
          f"{rng.choice(['先泡一壶茶', '沿着河边散步', '给窗台上的花浇水', '在本子上写几句话'])}。"
          f"有一天，{name}在{rng.choice(['门口', '抽屉里', '旧书里', '院子的角落'])}发现了{obj}。")
    p2 = (f"没有人知道它是从哪里来的。{name}去问{friend}，{friend}"
          f"{rng.choice(['想了很久也没有答案', '说这可能和一个老故事有关', '建议去镇上的档案馆看看'])}。"
          f"于是两个人{rng.choice(['花了一整个下午翻找旧资料', '挨家挨户地打听', '沿着线索走遍了小镇'])}。")
    p3 = (f"最后，{rng.choice(['答案比他们想象的简单得多', '原来它属于多年前搬走的一位邻居', '他们始终没有弄清全部的真相'])}。"
          f"{name}把它放在书架上，提醒自己{rng.choice(['平凡的日子里也会有惊喜', '遇到问题时可以向朋友求助', '好奇心值得珍惜'])}。")
    return [p1, p2, p3]


TOPICS = [weather, recipe, travel, science, story]


def paragraphs(rng: random.Random) -> list[str]:
    """One short Chinese document as a list of paragraphs."""
    return rng.choice(TOPICS)(rng)
