// Checks a message signed by the guest API (POST /sign) and the node's
// properties (GET /properties) with the official Aleph TypeScript SDK.
// Input on stdin: {"message": <signed message>, "properties": <properties>}.
// Exit 0 and "ok" when the SDK accepts them; exit 1 with the reason otherwise.
import { readFileSync } from "node:fs";
import { Blockchain } from "@aleph-sdk/core";
import { verifyEthereum } from "@aleph-sdk/evm";
import { SignedMessage } from "@aleph-sdk/message";
import { utils } from "ethers";

const fail = (why) => {
  console.error(why);
  process.exit(1);
};

const { message, properties } = JSON.parse(readFileSync(0, "utf8"));

if (properties.chain !== Blockchain.ETH) fail(`chain ${properties.chain}, want ${Blockchain.ETH}`);
if (properties.curve !== "secp256k1") fail(`curve ${properties.curve}`);
const fromPublicKey = utils.computeAddress(properties.public_key);
if (fromPublicKey !== properties.address) fail(`public key ${properties.public_key} is ${fromPublicKey}, not ${properties.address}`);
if (message.sender !== properties.address) fail(`sender ${message.sender}, want ${properties.address}`);

const signed = new SignedMessage({ ...message, content: JSON.parse(message.item_content) });
if (!verifyEthereum(signed, message.signature, properties.address)) fail("verifyEthereum refused the signature");

// The same check must refuse a message that is not the one signed.
const tampered = new SignedMessage({ ...message, item_hash: message.item_hash.replace(/.$/, (c) => (c === "0" ? "1" : "0")), content: {} });
if (verifyEthereum(tampered, message.signature, properties.address)) fail("verifyEthereum accepted a tampered message");

console.log("ok");
