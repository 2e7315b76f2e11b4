// A small Markdown renderer for chat answers: safe by construction (every character of
// the input is escaped; only the tags written here are produced) and tolerant of text
// that is still streaming (an unclosed code fence runs to the end).
//
// Blocks: fenced code (``` or ~~~, with a language), ATX headings, paragraphs (a single
// newline is a line break, as chat text expects), bullet and numbered lists (nested by
// indentation), block quotes, tables (GFM pipes), horizontal rules.
// Inline: `code`, **bold**, __bold__, *italic*, _italic_, ~~strike~~, [links](http...).
// Links are http(s) or mailto only; anything else stays text. Raw HTML is shown as text.

const ESC = { "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" };
export const escape = (s) => String(s).replace(/[&<>"']/g, (c) => ESC[c]);

function emphasis(s) {                       // s is already escaped
  return s
    .replace(/\[([^\]\n]+)\]\(((?:https?:\/\/|mailto:)[^\s)]+)\)/g,
      '<a href="$2" target="_blank" rel="noopener noreferrer">$1</a>')
    .replace(/\*\*(?=\S)([\s\S]*?\S)\*\*/g, "<strong>$1</strong>")
    .replace(/(^|[^\w])__(?=\S)([\s\S]*?\S)__(?!\w)/g, "$1<strong>$2</strong>")
    .replace(/(^|[^*\w])\*(?=[^\s*])([^*\n]*?[^\s*])\*(?!\*)/g, "$1<em>$2</em>")
    .replace(/(^|[^\w])_(?=[^\s_])([^_\n]*?[^\s_])_(?!\w)/g, "$1<em>$2</em>")
    .replace(/~~(?=\S)([\s\S]*?\S)~~/g, "<del>$1</del>");
}

export function inline(text) {
  let out = "", last = 0;
  for (const m of text.matchAll(/(`+)([^`]|[^`][\s\S]*?[^`])\1(?!`)/g)) {
    out += emphasis(escape(text.slice(last, m.index)));
    out += `<code>${escape(m[2].trim() ? m[2].replace(/^ (.*) $/, "$1") : m[2])}</code>`;
    last = m.index + m[0].length;
  }
  return out + emphasis(escape(text.slice(last)));
}

const FENCE = /^ {0,3}(`{3,}|~{3,})\s*([\w+#.-]*)[^`]*$/;
const HEADING = /^ {0,3}(#{1,6})\s+(.*?)\s*#*\s*$/;
const RULE = /^ {0,3}([-*_])(\s*\1){2,}\s*$/;
const QUOTE = /^ {0,3}>\s?(.*)$/;
const ITEM = /^(\s*)([-*+]|\d{1,9}[.)])\s+(.*)$/;
const TABLE_SEP = /^\s*\|?\s*:?-+:?\s*(\|\s*:?-+:?\s*)*\|?\s*$/;

function cells(line) {
  let s = line.trim();
  if (s.startsWith("|")) s = s.slice(1);
  if (s.endsWith("|") && !s.endsWith("\\|")) s = s.slice(0, -1);
  return s.split(/(?<!\\)\|/).map((c) => c.trim().replace(/\\\|/g, "|"));
}

function codeBlock(lang, body) {
  const cls = lang ? ` class="lang-${escape(lang)}"` : "";
  return `<div class="code"><div class="code-head"><span>${escape(lang || "text")}</span>` +
    `<button type="button" class="copy">copy</button></div><pre><code${cls}>${escape(body)}</code></pre></div>`;
}

function startsBlock(line) {
  return FENCE.test(line) || HEADING.test(line) || RULE.test(line) || QUOTE.test(line) || ITEM.test(line);
}

function list(lines, i) {
  const first = lines[i].match(ITEM);
  const indent = first[1].length, ordered = /\d/.test(first[2]);
  const items = [];
  while (i < lines.length) {
    const m = lines[i].match(ITEM);
    if (m && m[1].length === indent && /\d/.test(m[2]) === ordered) {
      items.push([m[3]]);
      i++;
    } else if (items.length && lines[i].trim() && (lines[i].match(/^\s*/)[0].length > indent)) {
      items[items.length - 1].push(lines[i].slice(Math.min(indent + 2, lines[i].match(/^\s*/)[0].length)));
      i++;
    } else if (items.length && !lines[i].trim() && i + 1 < lines.length &&
               (lines[i + 1].match(/^\s*/)[0].length > indent || (lines[i + 1].match(ITEM) || [])[1] === first[1])) {
      i++;                                 // a blank line inside the list
    } else break;
  }
  const start = ordered && parseInt(first[2], 10) !== 1 ? ` start="${parseInt(first[2], 10)}"` : "";
  const tag = ordered ? "ol" : "ul";
  const body = items.map((it) => {
    const rest = it.slice(1);
    if (!rest.length) return `<li>${inline(it[0])}</li>`;
    return `<li>${inline(it[0])}${blocks(rest)}</li>`;
  }).join("");
  return [`<${tag}${start}>${body}</${tag}>`, i];
}

function blocks(lines) {
  let out = "", i = 0;
  while (i < lines.length) {
    const line = lines[i];
    let m;
    if (!line.trim()) { i++; continue; }
    if ((m = line.match(FENCE))) {
      const mark = m[1], body = [];
      i++;
      while (i < lines.length && !new RegExp(`^ {0,3}${mark[0] === "`" ? "`" : "~"}{${mark.length},}\\s*$`).test(lines[i])) {
        body.push(lines[i]);
        i++;
      }
      i++;                                   // the closing fence (or past the end)
      out += codeBlock(m[2], body.join("\n"));
    } else if ((m = line.match(HEADING))) {
      const n = Math.min(6, m[1].length + 2);   // h3..h6: an answer sits under the page's own headings
      out += `<h${n}>${inline(m[2])}</h${n}>`;
      i++;
    } else if (RULE.test(line)) {
      out += "<hr>";
      i++;
    } else if (QUOTE.test(line)) {
      const body = [];
      while (i < lines.length && (m = lines[i].match(QUOTE))) { body.push(m[1]); i++; }
      out += `<blockquote>${blocks(body)}</blockquote>`;
    } else if (ITEM.test(line)) {
      const [html, next] = list(lines, i);
      out += html;
      i = next;
    } else if (line.includes("|") && i + 1 < lines.length && TABLE_SEP.test(lines[i + 1]) && lines[i + 1].includes("-")) {
      const head = cells(line);
      const align = cells(lines[i + 1]).map((c) => c.startsWith(":") && c.endsWith(":") ? "center" : c.endsWith(":") ? "right" : "");
      i += 2;
      const rows = [];
      while (i < lines.length && lines[i].includes("|") && lines[i].trim()) { rows.push(cells(lines[i])); i++; }
      const td = (tag, c, k) => `<${tag}${align[k] ? ` class="al-${align[k]}"` : ""}>${inline(c)}</${tag}>`;
      out += `<table><thead><tr>${head.map((c, k) => td("th", c, k)).join("")}</tr></thead><tbody>` +
        rows.map((r) => `<tr>${head.map((_, k) => td("td", r[k] || "", k)).join("")}</tr>`).join("") +
        "</tbody></table>";
    } else {
      const para = [];
      while (i < lines.length && lines[i].trim() && !(para.length && startsBlock(lines[i]))) {
        para.push(lines[i]);
        i++;
      }
      out += `<p>${para.map(inline).join("<br>")}</p>`;
    }
  }
  return out;
}

export function render(text) {
  return blocks(String(text || "").replace(/\r\n?/g, "\n").split("\n"));
}
