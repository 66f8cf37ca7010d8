//+------------------------------------------------------------------+
//| Json.mqh - flat JSON for the dynamic_core MT5 bridge protocol      |
//|                                                                    |
//| Every bridge message is ONE flat JSON object whose values are      |
//| strings, integers, floats or booleans (docs/mt5-bridge.md, sec. 2),|
//| so this file needs no general JSON library:                        |
//|   CDcJson        parses one UTF-8 frame into key -> scalar slots,  |
//|                  validates the full JSON syntax (nested values are |
//|                  parsed and recorded as "object"/"array" so that   |
//|                  typed reads refuse them), and offers typed,       |
//|                  range-checked reads that record the first failure |
//|                  with a protocol reason (invalid, version, ...).   |
//|   CDcJsonWriter  writes one flat object, ASCII only (\uXXXX for    |
//|                  everything else), finite numbers only.            |
//+------------------------------------------------------------------+
#ifndef DYNAMIC_CORE_JSON_MQH
#define DYNAMIC_CORE_JSON_MQH

#define DC_JSON_MAX_KEYS   64     // keys kept per object; more means unknown fields
#define DC_JSON_MAX_DEPTH  32     // nesting accepted (and skipped) inside a value

//--- what a value slot holds
#define DC_JK_STRING  1
#define DC_JK_INT     2           // integer literal that fits a long
#define DC_JK_BIGINT  3           // integer literal beyond the long range
#define DC_JK_FLOAT   4
#define DC_JK_BOOL    5
#define DC_JK_NULL    6
#define DC_JK_OBJECT  7
#define DC_JK_ARRAY   8

//--- failure priorities (a higher one wins when several fields fail)
#define DC_JP_NONE     0
#define DC_JP_INVALID  1
#define DC_JP_VERSION  2
#define DC_JP_UNKNOWN  3

//+------------------------------------------------------------------+
//| Characters allowed in a client_order_id: [A-Za-z0-9_.:-]           |
//+------------------------------------------------------------------+
bool DcIsIdChar(const ushort c)
  {
   if(c>='A' && c<='Z')
      return(true);
   if(c>='a' && c<='z')
      return(true);
   if(c>='0' && c<='9')
      return(true);
   return(c=='_' || c=='.' || c==':' || c=='-');
  }
//+------------------------------------------------------------------+
//| Length in Unicode code points (a surrogate pair counts once), the  |
//| unit of the protocol's string bounds                               |
//+------------------------------------------------------------------+
int DcCodePoints(const string s)
  {
   int n=StringLen(s);
   int cp=0;
   for(int i=0; i<n; i++)
     {
      ushort c=StringGetCharacter(s,i);
      if(c<0xDC00 || c>0xDFFF)
         cp++;
     }
   return(cp);
  }
//+------------------------------------------------------------------+
//| s cut to at most maxlen UTF-16 units, never inside a surrogate     |
//| pair (so also at most maxlen code points)                          |
//+------------------------------------------------------------------+
string DcClip(const string s,const int maxlen)
  {
   int n=StringLen(s);
   if(n<=maxlen)
      return(s);
   int cut=maxlen;
   if(cut>0)
     {
      ushort c=StringGetCharacter(s,cut-1);
      if(c>=0xD800 && c<=0xDBFF)
         cut--;
     }
   return(StringSubstr(s,0,cut));
  }
//+------------------------------------------------------------------+
//| Parser of one flat JSON object                                     |
//+------------------------------------------------------------------+
class CDcJson
  {
private:
   uchar             m_buf[];
   int               m_len;
   int               m_pos;
   ushort            m_tmp[];          // scratch for string decoding
   //--- the object
   int               m_count;
   bool              m_too_many;
   string            m_keys[DC_JSON_MAX_KEYS];
   int               m_kind[DC_JSON_MAX_KEYS];
   string            m_str[DC_JSON_MAX_KEYS];
   long              m_int[DC_JSON_MAX_KEYS];
   double            m_dbl[DC_JSON_MAX_KEYS];
   bool              m_bool[DC_JSON_MAX_KEYS];
   bool              m_used[DC_JSON_MAX_KEYS];
   //--- the last number parsed
   int               m_num_kind;
   long              m_num_int;
   double            m_num_dbl;
   //--- failure state
   string            m_reason;
   string            m_detail;
   int               m_prio;

   bool              Fail(const string reason,const string detail);
   bool              Eof(void) const { return(m_pos>=m_len); }
   void              SkipWs(void);
   bool              ParseString(string &out);
   bool              ParseNumber(void);
   bool              ParseLiteral(const string word);
   bool              ParseMember(const string key);
   bool              SkipValue(const int depth);
   bool              ReadHex4(int &value);
   void              Append(const ushort unit,int &n);
   int               Slot(const string key);
   string            KindName(const int kind) const;
   void              FieldFail(const int prio,const string reason,const string detail);
   bool              Lookup(const string key,const int prio,int &slot);

public:
                     CDcJson(void) : m_len(0),m_pos(0),m_count(0),m_too_many(false),m_prio(DC_JP_NONE) {}
   //--- parse buf[0..len) as one JSON object; false: Reason()/Detail() say why
   bool              Parse(const uchar &buf[],const int len);
   string            Reason(void) const { return(m_reason); }
   string            Detail(void) const { return(m_detail); }
   bool              Failed(void) const { return(m_prio!=DC_JP_NONE); }
   int               Count(void) const { return(m_count); }
   //--- a long at key, if there is one (no failure recorded): for ref_seq
   bool              PeekInt(const string key,long &out) const;
   //--- a string at key, if there is one (no failure recorded): for the type tag
   bool              PeekStr(const string key,string &out) const;
   //--- typed reads: false (and the first failure recorded) when missing/wrong
   bool              GetTag(string &out);
   bool              GetVersion(const string key,const long version,long &out);
   bool              GetInt(const string key,const long lo,const long hi,long &out);
   bool              GetDbl(const string key,const double lo,const double hi,const bool lo_exclusive,double &out);
   bool              GetStr(const string key,const int minlen,const int maxlen,string &out);
   bool              GetId(const string key,const int maxlen,string &out);
   bool              GetEnum(const string key,const string allowed,string &out);
   bool              GetBool(const string key,bool &out);
   //--- after the reads: unknown keys become unknown_field; false when anything failed
   bool              Finish(void);
  };
//+------------------------------------------------------------------+
bool CDcJson::Fail(const string reason,const string detail)
  {
   if(m_prio==DC_JP_NONE || m_reason=="")
     {
      m_reason=reason;
      m_detail=detail;
     }
   m_prio=DC_JP_UNKNOWN+1;   // syntax failures outrank every field failure
   return(false);
  }
//+------------------------------------------------------------------+
void CDcJson::FieldFail(const int prio,const string reason,const string detail)
  {
   if(prio>m_prio)
     {
      m_prio=prio;
      m_reason=reason;
      m_detail=detail;
     }
  }
//+------------------------------------------------------------------+
void CDcJson::SkipWs(void)
  {
   while(m_pos<m_len)
     {
      uchar c=m_buf[m_pos];
      if(c!=' ' && c!='\t' && c!='\n' && c!='\r')
         break;
      m_pos++;
     }
  }
//+------------------------------------------------------------------+
void CDcJson::Append(const ushort unit,int &n)
  {
   if(n>=ArraySize(m_tmp))
      ArrayResize(m_tmp,n+256);
   m_tmp[n++]=unit;
  }
//+------------------------------------------------------------------+
bool CDcJson::ReadHex4(int &value)
  {
   if(m_pos+4>m_len)
      return(Fail("truncated","Input data was truncated"));
   value=0;
   for(int k=0; k<4; k++)
     {
      uchar c=m_buf[m_pos++];
      int d;
      if(c>='0' && c<='9')
         d=c-'0';
      else
         if(c>='a' && c<='f')
            d=c-'a'+10;
         else
            if(c>='A' && c<='F')
               d=c-'A'+10;
            else
               return(Fail("malformed","JSON is malformed: invalid escape (byte "+IntegerToString(m_pos)+")"));
      value=value*16+d;
     }
   return(true);
  }
//+------------------------------------------------------------------+
//| A JSON string at m_pos (the opening quote) decoded to UTF-16       |
//+------------------------------------------------------------------+
bool CDcJson::ParseString(string &out)
  {
   int n=0;
   m_pos++;   // the opening quote
   while(true)
     {
      if(m_pos>=m_len)
         return(Fail("truncated","Input data was truncated"));
      uchar b=m_buf[m_pos];
      if(b=='"')
        {
         m_pos++;
         break;
        }
      if(b=='\\')
        {
         m_pos++;
         if(m_pos>=m_len)
            return(Fail("truncated","Input data was truncated"));
         uchar e=m_buf[m_pos++];
         if(e=='"' || e=='\\' || e=='/')
            Append((ushort)e,n);
         else
            if(e=='b')
               Append(0x08,n);
            else
               if(e=='f')
                  Append(0x0C,n);
               else
                  if(e=='n')
                     Append(0x0A,n);
                  else
                     if(e=='r')
                        Append(0x0D,n);
                     else
                        if(e=='t')
                           Append(0x09,n);
                        else
                           if(e=='u')
                             {
                              int u=0;
                              if(!ReadHex4(u))
                                 return(false);
                              if(u>=0xDC00 && u<=0xDFFF)
                                 return(Fail("malformed","JSON is malformed: unexpected utf-16 low surrogate (byte "+IntegerToString(m_pos)+")"));
                              if(u>=0xD800 && u<=0xDBFF)
                                {
                                 if(m_pos+2>m_len)
                                    return(Fail("truncated","Input data was truncated"));
                                 if(m_buf[m_pos]!='\\' || m_buf[m_pos+1]!='u')
                                    return(Fail("malformed","JSON is malformed: unexpected end of escaped utf-16 surrogate pair (byte "+IntegerToString(m_pos)+")"));
                                 m_pos+=2;
                                 int lo=0;
                                 if(!ReadHex4(lo))
                                    return(false);
                                 if(lo<0xDC00 || lo>0xDFFF)
                                    return(Fail("malformed","JSON is malformed: invalid utf-16 surrogate pair (byte "+IntegerToString(m_pos)+")"));
                                 Append((ushort)u,n);
                                 Append((ushort)lo,n);
                                }
                              else
                                 Append((ushort)(u==0 ? 0xFFFD : u),n);   // MQL5 strings cannot hold NUL
                             }
                           else
                              return(Fail("malformed","JSON is malformed: invalid escape character (byte "+IntegerToString(m_pos)+")"));
         continue;
        }
      if(b<0x20)
         return(Fail("malformed","JSON is malformed: invalid character in string (byte "+IntegerToString(m_pos+1)+")"));
      if(b<0x80)
        {
         Append((ushort)b,n);
         m_pos++;
         continue;
        }
      //--- UTF-8 multi-byte sequence, strictly checked
      int need=0;
      int cp=0;
      uchar lo_bound=0x80;
      uchar hi_bound=0xBF;
      if(b>=0xC2 && b<=0xDF)
        {
         need=1;
         cp=b&0x1F;
        }
      else
         if(b>=0xE0 && b<=0xEF)
           {
            need=2;
            cp=b&0x0F;
            if(b==0xE0)
               lo_bound=0xA0;
            if(b==0xED)
               hi_bound=0x9F;
           }
         else
            if(b>=0xF0 && b<=0xF4)
              {
               need=3;
               cp=b&0x07;
               if(b==0xF0)
                  lo_bound=0x90;
               if(b==0xF4)
                  hi_bound=0x8F;
              }
            else
               return(Fail("malformed","JSON is malformed: invalid utf-8 (byte "+IntegerToString(m_pos+1)+")"));
      if(m_pos+need>=m_len)
         return(Fail("truncated","Input data was truncated"));
      for(int k=1; k<=need; k++)
        {
         uchar c=m_buf[m_pos+k];
         uchar lb=(k==1) ? lo_bound : (uchar)0x80;
         uchar hb=(k==1) ? hi_bound : (uchar)0xBF;
         if(c<lb || c>hb)
            return(Fail("malformed","JSON is malformed: invalid utf-8 (byte "+IntegerToString(m_pos+k+1)+")"));
         cp=(cp<<6)|(c&0x3F);
        }
      m_pos+=need+1;
      if(cp>0xFFFF)
        {
         cp-=0x10000;
         Append((ushort)(0xD800+(cp>>10)),n);
         Append((ushort)(0xDC00+(cp&0x3FF)),n);
        }
      else
         Append((ushort)cp,n);
     }
   out=(n>0) ? ShortArrayToString(m_tmp,0,n) : "";
   return(true);
  }
//+------------------------------------------------------------------+
//| A JSON number at m_pos; sets m_num_kind/m_num_int/m_num_dbl        |
//+------------------------------------------------------------------+
bool CDcJson::ParseNumber(void)
  {
   int start=m_pos;
   bool neg=false;
   if(m_buf[m_pos]=='-')
     {
      neg=true;
      m_pos++;
     }
   if(m_pos>=m_len)
      return(Fail("truncated","Input data was truncated"));
   uchar c=m_buf[m_pos];
   bool overflow=false;
   long acc=0;            // accumulated as a negative number: reaches LONG_MIN
   if(c=='0')
      m_pos++;
   else
      if(c>='1' && c<='9')
        {
         while(m_pos<m_len && m_buf[m_pos]>='0' && m_buf[m_pos]<='9')
           {
            long d=(long)(m_buf[m_pos]-'0');
            if(!overflow)
              {
               if(acc<(LONG_MIN+d)/10)
                  overflow=true;
               else
                  acc=acc*10-d;
              }
            m_pos++;
           }
        }
      else
         return(Fail("malformed","JSON is malformed: invalid number (byte "+IntegerToString(m_pos+1)+")"));
   bool is_float=false;
   if(m_pos<m_len && m_buf[m_pos]=='.')
     {
      is_float=true;
      m_pos++;
      if(m_pos>=m_len)
         return(Fail("truncated","Input data was truncated"));
      if(m_buf[m_pos]<'0' || m_buf[m_pos]>'9')
         return(Fail("malformed","JSON is malformed: invalid number (byte "+IntegerToString(m_pos+1)+")"));
      while(m_pos<m_len && m_buf[m_pos]>='0' && m_buf[m_pos]<='9')
         m_pos++;
     }
   if(m_pos<m_len && (m_buf[m_pos]=='e' || m_buf[m_pos]=='E'))
     {
      is_float=true;
      m_pos++;
      if(m_pos<m_len && (m_buf[m_pos]=='+' || m_buf[m_pos]=='-'))
         m_pos++;
      if(m_pos>=m_len)
         return(Fail("truncated","Input data was truncated"));
      if(m_buf[m_pos]<'0' || m_buf[m_pos]>'9')
         return(Fail("malformed","JSON is malformed: invalid number (byte "+IntegerToString(m_pos+1)+")"));
      while(m_pos<m_len && m_buf[m_pos]>='0' && m_buf[m_pos]<='9')
         m_pos++;
     }
   //--- the token is plain ASCII: the terminal's own conversion reads it
   string token=CharArrayToString(m_buf,start,m_pos-start,CP_ACP);
   m_num_dbl=StringToDouble(token);
   if(is_float)
     {
      m_num_kind=DC_JK_FLOAT;
      m_num_int=0;
      return(true);
     }
   if(!neg && acc==LONG_MIN)
      overflow=true;       // 9223372036854775808
   if(overflow)
     {
      m_num_kind=DC_JK_BIGINT;
      m_num_int=0;
      return(true);
     }
   m_num_kind=DC_JK_INT;
   m_num_int=neg ? acc : -acc;
   m_num_dbl=(double)m_num_int;
   return(true);
  }
//+------------------------------------------------------------------+
bool CDcJson::ParseLiteral(const string word)
  {
   int n=StringLen(word);
   for(int k=0; k<n; k++)
     {
      if(m_pos+k>=m_len)
         return(Fail("truncated","Input data was truncated"));
      if(m_buf[m_pos+k]!=(uchar)StringGetCharacter(word,k))
         return(Fail("malformed","JSON is malformed: invalid character (byte "+IntegerToString(m_pos+k+1)+")"));
     }
   m_pos+=n;
   return(true);
  }
//+------------------------------------------------------------------+
//| Any JSON value, checked and discarded (inside a nested value)      |
//+------------------------------------------------------------------+
bool CDcJson::SkipValue(const int depth)
  {
   if(depth>DC_JSON_MAX_DEPTH)
      return(Fail("malformed","JSON is malformed: nesting deeper than "+IntegerToString(DC_JSON_MAX_DEPTH)));
   SkipWs();
   if(m_pos>=m_len)
      return(Fail("truncated","Input data was truncated"));
   uchar c=m_buf[m_pos];
   string scratch;
   if(c=='"')
      return(ParseString(scratch));
   if(c=='-' || (c>='0' && c<='9'))
      return(ParseNumber());
   if(c=='t')
      return(ParseLiteral("true"));
   if(c=='f')
      return(ParseLiteral("false"));
   if(c=='n')
      return(ParseLiteral("null"));
   if(c=='{' || c=='[')
     {
      uchar close=(c=='{') ? (uchar)'}' : (uchar)']';
      m_pos++;
      SkipWs();
      if(m_pos>=m_len)
         return(Fail("truncated","Input data was truncated"));
      if(m_buf[m_pos]==close)
        {
         m_pos++;
         return(true);
        }
      while(true)
        {
         if(c=='{')
           {
            SkipWs();
            if(m_pos>=m_len)
               return(Fail("truncated","Input data was truncated"));
            if(m_buf[m_pos]!='"')
               return(Fail("malformed","JSON is malformed: expected '\"' (byte "+IntegerToString(m_pos+1)+")"));
            if(!ParseString(scratch))
               return(false);
            SkipWs();
            if(m_pos>=m_len)
               return(Fail("truncated","Input data was truncated"));
            if(m_buf[m_pos]!=':')
               return(Fail("malformed","JSON is malformed: expected ':' (byte "+IntegerToString(m_pos+1)+")"));
            m_pos++;
           }
         if(!SkipValue(depth+1))
            return(false);
         SkipWs();
         if(m_pos>=m_len)
            return(Fail("truncated","Input data was truncated"));
         uchar d=m_buf[m_pos++];
         if(d==close)
            return(true);
         if(d!=',')
            return(Fail("malformed","JSON is malformed: expected ',' or '"+CharToString(close)+"' (byte "+IntegerToString(m_pos)+")"));
        }
     }
   return(Fail("malformed","JSON is malformed: invalid character (byte "+IntegerToString(m_pos+1)+")"));
  }
//+------------------------------------------------------------------+
//| The slot of key: the existing one (a repeated key: the last value  |
//| wins, as in the engine's decoder) or a new one; -1 when full       |
//+------------------------------------------------------------------+
int CDcJson::Slot(const string key)
  {
   for(int i=0; i<m_count; i++)
      if(m_keys[i]==key)
         return(i);
   if(m_count>=DC_JSON_MAX_KEYS)
     {
      m_too_many=true;
      return(-1);
     }
   m_keys[m_count]=key;
   m_used[m_count]=false;
   return(m_count++);
  }
//+------------------------------------------------------------------+
//| The value of one member of the top-level object                    |
//+------------------------------------------------------------------+
bool CDcJson::ParseMember(const string key)
  {
   uchar c=m_buf[m_pos];
   int kind=DC_JK_NULL;
   string s="";
   long iv=0;
   double dv=0.0;
   bool bv=false;
   if(c=='"')
     {
      if(!ParseString(s))
         return(false);
      kind=DC_JK_STRING;
     }
   else
      if(c=='-' || (c>='0' && c<='9'))
        {
         if(!ParseNumber())
            return(false);
         kind=m_num_kind;
         iv=m_num_int;
         dv=m_num_dbl;
        }
      else
         if(c=='t')
           {
            if(!ParseLiteral("true"))
               return(false);
            kind=DC_JK_BOOL;
            bv=true;
           }
         else
            if(c=='f')
              {
               if(!ParseLiteral("false"))
                  return(false);
               kind=DC_JK_BOOL;
              }
            else
               if(c=='n')
                 {
                  if(!ParseLiteral("null"))
                     return(false);
                  kind=DC_JK_NULL;
                 }
               else
                  if(c=='{' || c=='[')
                    {
                     kind=(c=='{') ? DC_JK_OBJECT : DC_JK_ARRAY;
                     if(!SkipValue(1))
                        return(false);
                    }
                  else
                     return(Fail("malformed","JSON is malformed: invalid character (byte "+IntegerToString(m_pos+1)+")"));
   int i=Slot(key);
   if(i<0)
      return(true);
   m_kind[i]=kind;
   m_str[i]=s;
   m_int[i]=iv;
   m_dbl[i]=dv;
   m_bool[i]=bv;
   return(true);
  }
//+------------------------------------------------------------------+
bool CDcJson::Parse(const uchar &buf[],const int len)
  {
   m_count=0;
   m_too_many=false;
   m_reason="";
   m_detail="";
   m_prio=DC_JP_NONE;
   m_len=len;
   m_pos=0;
   if(ArraySize(m_buf)<len)
      ArrayResize(m_buf,len);
   if(len>0)
      ArrayCopy(m_buf,buf,0,0,len);
   SkipWs();
   if(m_pos>=m_len)
      return(Fail("truncated","Input data was truncated"));
   uchar c=m_buf[m_pos];
   if(c!='{')
     {
      if(c=='[')
         return(Fail("invalid","Expected `object`, got `array`"));
      if(c=='"')
         return(Fail("invalid","Expected `object`, got `str`"));
      if(c=='-' || (c>='0' && c<='9'))
         return(Fail("invalid","Expected `object`, got `number`"));
      if(c=='t' || c=='f')
         return(Fail("invalid","Expected `object`, got `bool`"));
      if(c=='n')
         return(Fail("invalid","Expected `object`, got `null`"));
      return(Fail("malformed","JSON is malformed: invalid character (byte "+IntegerToString(m_pos+1)+")"));
     }
   m_pos++;
   SkipWs();
   if(m_pos>=m_len)
      return(Fail("truncated","Input data was truncated"));
   if(m_buf[m_pos]=='}')
      m_pos++;
   else
      while(true)
        {
         SkipWs();
         if(m_pos>=m_len)
            return(Fail("truncated","Input data was truncated"));
         if(m_buf[m_pos]!='"')
            return(Fail("malformed","JSON is malformed: expected '\"' (byte "+IntegerToString(m_pos+1)+")"));
         string key;
         if(!ParseString(key))
            return(false);
         SkipWs();
         if(m_pos>=m_len)
            return(Fail("truncated","Input data was truncated"));
         if(m_buf[m_pos]!=':')
            return(Fail("malformed","JSON is malformed: expected ':' (byte "+IntegerToString(m_pos+1)+")"));
         m_pos++;
         SkipWs();
         if(m_pos>=m_len)
            return(Fail("truncated","Input data was truncated"));
         if(!ParseMember(key))
            return(false);
         SkipWs();
         if(m_pos>=m_len)
            return(Fail("truncated","Input data was truncated"));
         uchar d=m_buf[m_pos++];
         if(d=='}')
            break;
         if(d!=',')
            return(Fail("malformed","JSON is malformed: expected ',' or '}' (byte "+IntegerToString(m_pos)+")"));
        }
   SkipWs();
   if(m_pos<m_len)
      return(Fail("malformed","JSON is malformed: trailing characters (byte "+IntegerToString(m_pos+1)+")"));
   return(true);
  }
//+------------------------------------------------------------------+
string CDcJson::KindName(const int kind) const
  {
   if(kind==DC_JK_STRING)
      return("str");
   if(kind==DC_JK_INT || kind==DC_JK_BIGINT)
      return("int");
   if(kind==DC_JK_FLOAT)
      return("float");
   if(kind==DC_JK_BOOL)
      return("bool");
   if(kind==DC_JK_NULL)
      return("null");
   if(kind==DC_JK_OBJECT)
      return("object");
   return("array");
  }
//+------------------------------------------------------------------+
bool CDcJson::Lookup(const string key,const int prio,int &slot)
  {
   for(int i=0; i<m_count; i++)
      if(m_keys[i]==key)
        {
         m_used[i]=true;
         slot=i;
         return(true);
        }
   slot=-1;
   FieldFail(prio,"invalid","Object missing required field `"+key+"`");
   return(false);
  }
//+------------------------------------------------------------------+
bool CDcJson::PeekInt(const string key,long &out) const
  {
   for(int i=0; i<m_count; i++)
      if(m_keys[i]==key && m_kind[i]==DC_JK_INT)
        {
         out=m_int[i];
         return(true);
        }
   return(false);
  }
//+------------------------------------------------------------------+
bool CDcJson::PeekStr(const string key,string &out) const
  {
   for(int i=0; i<m_count; i++)
      if(m_keys[i]==key && m_kind[i]==DC_JK_STRING)
        {
         out=m_str[i];
         return(true);
        }
   return(false);
  }
//+------------------------------------------------------------------+
//| The "type" tag; its failures are reason unknown_tag                |
//+------------------------------------------------------------------+
bool CDcJson::GetTag(string &out)
  {
   for(int i=0; i<m_count; i++)
      if(m_keys[i]=="type")
        {
         m_used[i]=true;
         if(m_kind[i]!=DC_JK_STRING)
           {
            FieldFail(DC_JP_UNKNOWN+1,"unknown_tag","Expected `str`, got `"+KindName(m_kind[i])+"` - at `$.type`");
            return(false);
           }
         out=m_str[i];
         return(true);
        }
   FieldFail(DC_JP_UNKNOWN+1,"unknown_tag","Object missing required field `type`");
   return(false);
  }
//+------------------------------------------------------------------+
//| The version field: a wrong type or value is reason "version"       |
//+------------------------------------------------------------------+
bool CDcJson::GetVersion(const string key,const long version,long &out)
  {
   int i;
   if(!Lookup(key,DC_JP_INVALID,i))
      return(false);
   if(m_kind[i]!=DC_JK_INT)
     {
      FieldFail(DC_JP_VERSION,"version","Expected `int`, got `"+KindName(m_kind[i])+"` - at `$."+key+"`");
      return(false);
     }
   if(m_int[i]!=version)
     {
      FieldFail(DC_JP_VERSION,"version","Expected `int` == "+IntegerToString(version)+" - at `$."+key+"`");
      return(false);
     }
   out=m_int[i];
   return(true);
  }
//+------------------------------------------------------------------+
bool CDcJson::GetInt(const string key,const long lo,const long hi,long &out)
  {
   int i;
   if(!Lookup(key,DC_JP_INVALID,i))
      return(false);
   if(m_kind[i]==DC_JK_BIGINT)
     {
      FieldFail(DC_JP_INVALID,"invalid","Expected `int` <= "+IntegerToString(hi)+" - at `$."+key+"`");
      return(false);
     }
   if(m_kind[i]!=DC_JK_INT)
     {
      FieldFail(DC_JP_INVALID,"invalid","Expected `int`, got `"+KindName(m_kind[i])+"` - at `$."+key+"`");
      return(false);
     }
   if(m_int[i]<lo)
     {
      FieldFail(DC_JP_INVALID,"invalid","Expected `int` >= "+IntegerToString(lo)+" - at `$."+key+"`");
      return(false);
     }
   if(m_int[i]>hi)
     {
      FieldFail(DC_JP_INVALID,"invalid","Expected `int` <= "+IntegerToString(hi)+" - at `$."+key+"`");
      return(false);
     }
   out=m_int[i];
   return(true);
  }
//+------------------------------------------------------------------+
//| A float; an integer literal is accepted too; finite only           |
//+------------------------------------------------------------------+
bool CDcJson::GetDbl(const string key,const double lo,const double hi,const bool lo_exclusive,double &out)
  {
   int i;
   if(!Lookup(key,DC_JP_INVALID,i))
      return(false);
   int k=m_kind[i];
   if(k!=DC_JK_FLOAT && k!=DC_JK_INT && k!=DC_JK_BIGINT)
     {
      FieldFail(DC_JP_INVALID,"invalid","Expected `float`, got `"+KindName(k)+"` - at `$."+key+"`");
      return(false);
     }
   double v=m_dbl[i];
   if(!MathIsValidNumber(v))
     {
      FieldFail(DC_JP_INVALID,"invalid","Number out of range - at `$."+key+"`");
      return(false);
     }
   if(lo_exclusive ? (v<=lo) : (v<lo))
     {
      FieldFail(DC_JP_INVALID,"invalid","Expected `float` "+(lo_exclusive ? ">" : ">=")+" "+DoubleToString(lo,1)+" - at `$."+key+"`");
      return(false);
     }
   if(v>hi)
     {
      FieldFail(DC_JP_INVALID,"invalid","Expected `float` <= "+DoubleToString(hi,1)+" - at `$."+key+"`");
      return(false);
     }
   out=v;
   return(true);
  }
//+------------------------------------------------------------------+
bool CDcJson::GetStr(const string key,const int minlen,const int maxlen,string &out)
  {
   int i;
   if(!Lookup(key,DC_JP_INVALID,i))
      return(false);
   if(m_kind[i]!=DC_JK_STRING)
     {
      FieldFail(DC_JP_INVALID,"invalid","Expected `str`, got `"+KindName(m_kind[i])+"` - at `$."+key+"`");
      return(false);
     }
   int n=DcCodePoints(m_str[i]);
   if(n<minlen)
     {
      FieldFail(DC_JP_INVALID,"invalid","Expected `str` of length >= "+IntegerToString(minlen)+" - at `$."+key+"`");
      return(false);
     }
   if(n>maxlen)
     {
      FieldFail(DC_JP_INVALID,"invalid","Expected `str` of length <= "+IntegerToString(maxlen)+" - at `$."+key+"`");
      return(false);
     }
   out=m_str[i];
   return(true);
  }
//+------------------------------------------------------------------+
//| A client_order_id: 1..maxlen characters of [A-Za-z0-9_.:-]         |
//+------------------------------------------------------------------+
bool CDcJson::GetId(const string key,const int maxlen,string &out)
  {
   string s;
   if(!GetStr(key,1,maxlen,s))
      return(false);
   int n=StringLen(s);
   for(int k=0; k<n; k++)
      if(!DcIsIdChar(StringGetCharacter(s,k)))
        {
         FieldFail(DC_JP_INVALID,"invalid","Expected `str` matching regex '^[A-Za-z0-9_.:-]+$' - at `$."+key+"`");
         return(false);
        }
   out=s;
   return(true);
  }
//+------------------------------------------------------------------+
//| One of the values listed in allowed, separated by '|'              |
//+------------------------------------------------------------------+
bool CDcJson::GetEnum(const string key,const string allowed,string &out)
  {
   int i;
   if(!Lookup(key,DC_JP_INVALID,i))
      return(false);
   if(m_kind[i]!=DC_JK_STRING)
     {
      FieldFail(DC_JP_INVALID,"invalid","Expected `str`, got `"+KindName(m_kind[i])+"` - at `$."+key+"`");
      return(false);
     }
   string parts[];
   int n=StringSplit(allowed,'|',parts);
   for(int k=0; k<n; k++)
      if(parts[k]==m_str[i])
        {
         out=m_str[i];
         return(true);
        }
   FieldFail(DC_JP_INVALID,"invalid","Invalid enum value '"+DcClip(m_str[i],32)+"' - at `$."+key+"`");
   return(false);
  }
//+------------------------------------------------------------------+
bool CDcJson::GetBool(const string key,bool &out)
  {
   int i;
   if(!Lookup(key,DC_JP_INVALID,i))
      return(false);
   if(m_kind[i]!=DC_JK_BOOL)
     {
      FieldFail(DC_JP_INVALID,"invalid","Expected `bool`, got `"+KindName(m_kind[i])+"` - at `$."+key+"`");
      return(false);
     }
   out=m_bool[i];
   return(true);
  }
//+------------------------------------------------------------------+
bool CDcJson::Finish(void)
  {
   if(m_too_many)
      FieldFail(DC_JP_UNKNOWN,"unknown_field","Object contains more than "+IntegerToString(DC_JSON_MAX_KEYS)+" fields");
   for(int i=0; i<m_count; i++)
      if(!m_used[i])
        {
         FieldFail(DC_JP_UNKNOWN,"unknown_field","Object contains unknown field `"+DcClip(m_keys[i],64)+"`");
         break;
        }
   return(m_prio==DC_JP_NONE);
  }
//+------------------------------------------------------------------+
//| Writer of one flat JSON object                                     |
//+------------------------------------------------------------------+
class CDcJsonWriter
  {
private:
   string            m_s;
   bool              m_first;
   void              Key(const string key);
public:
                     CDcJsonWriter(void) : m_s("{"),m_first(true) {}
   void              Str(const string key,const string value,const int maxlen);
   void              Int(const string key,const long value);
   void              Dbl(const string key,const double value);
   void              Bool(const string key,const bool value);
   string            End(void) { return(m_s+"}"); }
  };
//+------------------------------------------------------------------+
//| s as a JSON string literal, ASCII only                             |
//+------------------------------------------------------------------+
string DcJsonQuote(const string s)
  {
   string out="\"";
   int n=StringLen(s);
   for(int i=0; i<n; i++)
     {
      ushort c=StringGetCharacter(s,i);
      if(c=='"')
         out+="\\\"";
      else
         if(c=='\\')
            out+="\\\\";
         else
            if(c=='\n')
               out+="\\n";
            else
               if(c=='\r')
                  out+="\\r";
               else
                  if(c=='\t')
                     out+="\\t";
                  else
                     if(c>=0x20 && c<0x7F)
                        out+=ShortToString(c);
                     else
                        if(c>=0xD800 && c<=0xDBFF && i+1<n && StringGetCharacter(s,i+1)>=0xDC00 && StringGetCharacter(s,i+1)<=0xDFFF)
                          {
                           out+=StringFormat("\\u%04x\\u%04x",c,StringGetCharacter(s,i+1));
                           i++;
                          }
                        else
                           if(c>=0xD800 && c<=0xDFFF)
                              out+="\\ufffd";        // a lone surrogate is not valid JSON
                           else
                              out+=StringFormat("\\u%04x",c);
     }
   return(out+"\"");
  }
//+------------------------------------------------------------------+
//| The shortest decimal form that reads back as the same double       |
//+------------------------------------------------------------------+
string DcJsonNumber(const double v)
  {
   if(!MathIsValidNumber(v))
     {
      Print("DynamicCoreEA: a non-finite number was written as 0");
      return("0");
     }
   if(v==0.0)
      return("0.0");
   string s="";
   for(int p=15; p<=17; p++)
     {
      s=StringFormat("%."+IntegerToString(p)+"g",v);
      if(StringToDouble(s)==v)
         break;
     }
   return(s);
  }
//+------------------------------------------------------------------+
void CDcJsonWriter::Key(const string key)
  {
   if(!m_first)
      m_s+=",";
   m_first=false;
   m_s+="\""+key+"\":";
  }
//+------------------------------------------------------------------+
void CDcJsonWriter::Str(const string key,const string value,const int maxlen)
  {
   Key(key);
   m_s+=DcJsonQuote(DcClip(value,maxlen));
  }
//+------------------------------------------------------------------+
void CDcJsonWriter::Int(const string key,const long value)
  {
   Key(key);
   m_s+=IntegerToString(value);
  }
//+------------------------------------------------------------------+
void CDcJsonWriter::Dbl(const string key,const double value)
  {
   Key(key);
   m_s+=DcJsonNumber(value);
  }
//+------------------------------------------------------------------+
void CDcJsonWriter::Bool(const string key,const bool value)
  {
   Key(key);
   m_s+=(value ? "true" : "false");
  }
#endif // DYNAMIC_CORE_JSON_MQH
//+------------------------------------------------------------------+
