// Decodes Avro single-object messages with Java Avro's BinaryMessageDecoder, an implementation
// independent of the project's (fastavro). Used by tests/schemas/test_java_avro.py.
//
// Usage: java AvroDecode <messages file> <schema.avsc>...
//   The .avsc files are parsed in the order given by one parser (later ones may refer to named
//   types of earlier ones). Prints one JSON line per schema: {"schema": full name,
//   "fingerprint": the 8 bytes of the single-object header, hex, "canonical": the Parsing
//   Canonical Form}. Then, for each line "<schema full name> <hex value>" of the messages file,
//   one JSON line: {"ok": true, "record": ...} (bytes as hex) or {"ok": false, "error": "..."}.

import java.io.File;
import java.nio.ByteBuffer;
import java.nio.ByteOrder;
import java.nio.file.Files;
import java.util.Collection;
import java.util.HexFormat;
import java.util.LinkedHashMap;
import java.util.List;
import java.util.Map;
import org.apache.avro.Schema;
import org.apache.avro.SchemaNormalization;
import org.apache.avro.generic.GenericData;
import org.apache.avro.generic.GenericEnumSymbol;
import org.apache.avro.generic.GenericRecord;
import org.apache.avro.message.BinaryMessageDecoder;

public final class AvroDecode {
  private AvroDecode() {}

  public static void main(String[] args) throws Exception {
    Schema.Parser parser = new Schema.Parser();
    Map<String, BinaryMessageDecoder<GenericRecord>> decoders = new LinkedHashMap<>();
    for (int i = 1; i < args.length; i++) {
      Schema schema = parser.parse(new File(args[i]));
      byte[] fp =
          ByteBuffer.allocate(8)
              .order(ByteOrder.LITTLE_ENDIAN)
              .putLong(SchemaNormalization.parsingFingerprint64(schema))
              .array();
      StringBuilder out = new StringBuilder("{\"schema\":");
      json(schema.getFullName(), out);
      out.append(",\"fingerprint\":");
      json(HexFormat.of().formatHex(fp), out);
      out.append(",\"canonical\":");
      json(SchemaNormalization.toParsingForm(schema), out);
      System.out.println(out.append('}'));
      // A decoder knows only the reader schema's own fingerprint: nothing else is accepted.
      decoders.put(schema.getFullName(), new BinaryMessageDecoder<>(GenericData.get(), schema));
    }
    List<String> lines = Files.readAllLines(new File(args[0]).toPath());
    for (String line : lines) {
      if (line.isBlank()) {
        continue;
      }
      String[] parts = line.trim().split(" ", 2);
      StringBuilder out = new StringBuilder();
      try {
        BinaryMessageDecoder<GenericRecord> decoder = decoders.get(parts[0]);
        if (decoder == null) {
          throw new IllegalArgumentException("no schema named " + parts[0]);
        }
        GenericRecord record = decoder.decode(HexFormat.of().parseHex(parts[1]));
        out.append("{\"ok\":true,\"record\":");
        json(record, out);
      } catch (Exception e) {
        out.setLength(0);
        out.append("{\"ok\":false,\"error\":");
        json(e.getClass().getSimpleName() + ": " + e.getMessage(), out);
      }
      System.out.println(out.append('}'));
    }
  }

  private static void json(Object value, StringBuilder out) {
    if (value == null) {
      out.append("null");
    } else if (value instanceof GenericRecord record) {
      out.append('{');
      boolean first = true;
      for (Schema.Field field : record.getSchema().getFields()) {
        if (!first) {
          out.append(',');
        }
        first = false;
        json(field.name(), out);
        out.append(':');
        json(record.get(field.pos()), out);
      }
      out.append('}');
    } else if (value instanceof Map<?, ?> map) {
      out.append('{');
      boolean first = true;
      for (Map.Entry<?, ?> entry : map.entrySet()) {
        if (!first) {
          out.append(',');
        }
        first = false;
        json(entry.getKey().toString(), out);
        out.append(':');
        json(entry.getValue(), out);
      }
      out.append('}');
    } else if (value instanceof Collection<?> items) {
      out.append('[');
      boolean first = true;
      for (Object item : items) {
        if (!first) {
          out.append(',');
        }
        first = false;
        json(item, out);
      }
      out.append(']');
    } else if (value instanceof ByteBuffer buffer) {
      byte[] bytes = new byte[buffer.remaining()];
      buffer.duplicate().get(bytes);
      json(HexFormat.of().formatHex(bytes), out);
    } else if (value instanceof Number || value instanceof Boolean) {
      out.append(value);
    } else if (value instanceof GenericEnumSymbol<?> || value instanceof CharSequence) {
      String text = value.toString();
      out.append('"');
      for (int i = 0; i < text.length(); i++) {
        char c = text.charAt(i);
        if (c == '"' || c == '\\') {
          out.append('\\').append(c);
        } else if (c < 0x20) {
          out.append(String.format("\\u%04x", (int) c));
        } else {
          out.append(c);
        }
      }
      out.append('"');
    } else {
      throw new IllegalStateException("unexpected value of " + value.getClass());
    }
  }
}
